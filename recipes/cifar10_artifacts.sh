#!/usr/bin/env bash
# The CIFAR-10 artifacts that docs/records/bench.md and docs/records/export.md measure, built from the repository:
#
#   recipes/cifar10_artifacts.sh            # -> runs/cifar10/{teacher,student}.pt, runs/cifar10-bundles/*
#   DATA=/path/to/cifar10 recipes/cifar10_artifacts.sh
#
# DATA is an ImageFolder copy of CIFAR-10 (train/ and test/), ../shared/data/cifar10 by default.
# About 25 minutes on 2 cores: 2 teacher epochs + 3 student epochs of seed-teacher -> compact-student,
# then the student and the teacher in every format and precision, each checked on the 10,000 test
# images. Every step is an ordinary edgekd command, printed before it runs; a step whose output
# already exists is skipped, so a stopped run continues where it was.
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEKD=${EDGEKD:-edgekd}
command -v "$EDGEKD" >/dev/null || EDGEKD=".venv/bin/edgekd"
DATA=${DATA:-../shared/data/cifar10}
RUN=runs/cifar10
BUNDLES=runs/cifar10-bundles

step() {  # step OUTPUT COMMAND...: run COMMAND unless OUTPUT exists
  local output=$1; shift
  if [ -e "$output" ]; then echo "# have $output"; return; fi
  echo "+ $*"; "$@"
}

step "$RUN/student.pt" "$EDGEKD" distill --data "$DATA" --epochs 3 --teacher-epochs 2 --out "$RUN" --no-progress
for model in student teacher; do
  for format in onnx openvino; do
    for precision in fp32 fp16 int8; do
      step "$BUNDLES/$model-$format-$precision" "$EDGEKD" export "$RUN/$model.pt" --format "$format" \
        --precision "$precision" --val-size 10000 --out "$BUNDLES/$model-$format-$precision" --no-progress
    done
  done
done
echo "# artifacts in $RUN and $BUNDLES"
