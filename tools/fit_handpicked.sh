#!/usr/bin/env bash
# A hand-picked student for the comparison in docs/records/fit.md, made the usual way: distil with the fit's data
# options and teacher-cache recipe, export at a precision and runtime that meet the budget, bench it on the device
# in a separate process; prints the wall time.
#   usage: tools/fit_handpicked.sh NAME STUDENT EPOCHS FORMAT PRECISION
#   env:   TEACHER (runs/teacher/model.pt), DATA (../shared/data/cifar10), OUT (runs/handpicked), CPU (1: the core
#          everything is pinned to), SUBSET (10000)
set -euo pipefail
NAME=$1 STUDENT=$2 EPOCHS=$3 FORMAT=$4 PRECISION=$5
TEACHER=${TEACHER:-runs/teacher/model.pt} DATA=${DATA:-../shared/data/cifar10} OUT=${OUT:-runs/handpicked}
CPU=${CPU:-1} SUBSET=${SUBSET:-10000}
E="taskset -c $CPU ${BIN:-.venv/bin}/edgekd"
D=$OUT/$NAME
mkdir -p "$OUT"
start=$(date +%s)
$E distill --teacher "$TEACHER" --student "$STUDENT" --data "$DATA" --train-subset "$SUBSET" --teacher-views 2 \
  --teacher-cache "$D-cache" --threads 1 --epochs "$EPOCHS" --no-progress --out "$D"
$E export "$D/student.pt" --format "$FORMAT" --precision "$PRECISION" --no-progress --no-speed-check --out "$D-bundle"
$E bench "$D-bundle" --device cpu --threads 1 --no-progress --out "$D-bench"
echo "$NAME $STUDENT epochs=$EPOCHS $FORMAT/$PRECISION wall_s=$(( $(date +%s) - start ))"
