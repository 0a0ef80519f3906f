#!/usr/bin/env bash
# The CUDA path end to end on a GPU machine, small and quick (a few minutes on one GPU): train a
# teacher on digits, distill with --amp and --channels-last, export ONNX, bench torch and ONNX Runtime
# on --device cuda. Writes summary.json and summary.md (the figures) and every run's outputs.
#
#   tools/cuda_check.sh [OUT_DIR]      # OUT_DIR default: $OUT, else ./cuda-check
#
# Packages: it runs the python named by $PYTHON (default: python3 on PATH), which must already hold a
# CUDA build of torch (check: python -c "import torch; print(torch.cuda.is_available())"). If that python
# cannot import edgekd, it installs this checkout with `pip install --no-deps -e .` (the other
# dependencies - onnx, onnxruntime, onnxscript, scikit-learn, tqdm, pyyaml - must be there; `pip install
# -e .` installs them when there is an index). ONNX Runtime's CUDA provider comes from onnxruntime-gpu:
# when the installed onnxruntime has no CUDAExecutionProvider, the script installs onnxruntime-gpu into
# a private folder (OUT_DIR/ort-gpu, put first on PYTHONPATH; the environment is left as it was) from
# $ORT_GPU_WHEEL (a wheel file, for machines without an index) or from the package index. It finds
# cuDNN and cuBLAS in the nvidia-* packages that torch's wheel installed. Without a wheel or an index
# the ONNX Runtime CUDA row is reported as skipped, with the reason; the rest still runs.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR=$(mkdir -p "${1:-${OUT:-cuda-check}}" && cd "${1:-${OUT:-cuda-check}}" && pwd)
PY=${PYTHON:-python3}
LOG="$OUT_DIR/cuda_check.log"
: > "$LOG"
export OPENVINO_TELEMETRY_OPT_OUT=1
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME COMMAND...: run, time, record ok/failed; the output goes to the log
    local name=$1 start rc
    shift
    echo "== $name: $*" | tee -a "$LOG"
    start=$(date +%s%N)
    "$@" >> "$LOG" 2>&1
    rc=$?
    SECONDS_TAKEN[$name]=$(( ($(date +%s%N) - start) / 1000000 ))
    if [ $rc -eq 0 ]; then STATUS[$name]=ok; else STATUS[$name]="failed (exit $rc, see cuda_check.log)"; fi
    echo "   ${STATUS[$name]} in ${SECONDS_TAKEN[$name]} ms" | tee -a "$LOG"
    return $rc
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "cuda_check: torch here has no CUDA device (torch.cuda.is_available() is False)" >&2
    exit 2
fi
"$PY" -c "import edgekd" 2>/dev/null || step install-edgekd "$PY" -m pip install -q --no-deps -e .

# ONNX Runtime with its CUDA provider, in a private folder when the installed one lacks it.
ORT_NOTE="installed onnxruntime has CUDAExecutionProvider"
if ! "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    ORT_NOTE="onnxruntime-gpu installed into $OUT_DIR/ort-gpu"
    step install-onnxruntime-gpu "$PY" -m pip install -q --no-deps --target "$OUT_DIR/ort-gpu" \
        "${ORT_GPU_WHEEL:-onnxruntime-gpu}" || ORT_NOTE="onnxruntime-gpu could not be installed (no wheel, no index)"
    export PYTHONPATH="$OUT_DIR/ort-gpu${PYTHONPATH:+:$PYTHONPATH}"
fi
# The CUDA libraries of torch's nvidia-* wheels, for ONNX Runtime's CUDA provider (a worker without torch).
NVLIBS=$("$PY" -c "import glob, os, site; print(':'.join(sorted(glob.glob(os.path.join(site.getsitepackages()[0], 'nvidia', '*', 'lib')))))")
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

RUN="$OUT_DIR/run"
step train "$PY" -m edgekd train --model seed-teacher --data digits --epochs 2 --device cuda --amp bf16 \
    --channels-last on --out "$RUN/teacher" --force --no-progress
step distill "$PY" -m edgekd distill --teacher "$RUN/teacher/model.pt" --epochs 2 --device cuda --amp fp16 \
    --channels-last on --out "$RUN/distill" --force --no-progress
step export "$PY" -m edgekd export "$RUN/distill/student.pt" --format onnx --out "$RUN/student-onnx" --no-progress
step bench-torch "$PY" -m edgekd bench "$RUN/teacher/model.pt" "$RUN/distill/student.pt" --device cuda \
    --backends torch --batch-sizes 1,64 --out "$RUN/bench-torch" --no-progress
step bench-onnxruntime "$PY" -m edgekd bench "$RUN/student-onnx" --device cuda --backends onnxruntime \
    --batch-sizes 1,64 --out "$RUN/bench-onnxruntime" --no-progress

# The figures: one JSON and one markdown table from the runs' own files.
for name in "${!STATUS[@]}"; do echo "$name	${STATUS[$name]}	${SECONDS_TAKEN[$name]}"; done > "$OUT_DIR/steps.tsv"
"$PY" - "$OUT_DIR" "$ORT_NOTE" <<'EOF'
import json, os, sys

out, ort_note = sys.argv[1], sys.argv[2]
run = os.path.join(out, "run")


def load(*parts):
    path = os.path.join(run, *parts)
    return json.load(open(path)) if os.path.isfile(path) else None


steps = {}
for line in open(os.path.join(out, "steps.tsv")):
    name, status, seconds = line.rstrip("\n").split("\t")
    steps[name] = {"status": status, "seconds": int(seconds or 0) / 1000}
import torch

summary = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "onnxruntime": ort_note,
           "steps": steps, "teacher": load("teacher", "metrics.json"), "distill": load("distill", "metrics.json"),
           "export": load("student-onnx", "manifest.json"), "rows": []}
for name in ("bench-torch", "bench-onnxruntime"):
    results = load(name, "results.json")
    summary["rows"] += results["rows"] if results else [{"model": name, "status": steps.get(name, {}).get("status")}]
for key in ("teacher", "distill"):
    if summary[key]:
        summary[key] = {k: summary[key].get(k) for k in ("model", "epochs", "test_top1", "params", "flops")}
if summary["export"]:
    summary["export"] = {"precision": summary["export"]["precision"], "validation": summary["export"]["validation"]}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
lines = [f"# CUDA check on {summary['gpu']} (torch {summary['torch']}; {ort_note})", "",
         "| step | status | seconds |", "|---|---|---|"]
lines += [f"| {k} | {v['status']} | {v['seconds']:.1f} |" for k, v in sorted(steps.items())]
lines += ["", "| model | backend | device | batch | top-1 | p50 ms | throughput img/s | status |", "|---|---|---|---|---|---|---|---|"]
for r in summary["rows"]:
    p50 = (r.get("latency_ms") or {}).get("p50")
    lines.append(f"| {r.get('model')} | {r.get('backend', '')} | {r.get('device', '')} | {r.get('batch_size', '')} | "
                 f"{r.get('top1', '')} | {p50 if p50 is not None else ''} | {r.get('throughput_ips', '')} | {r.get('status')} |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
failed=0
for name in "${!STATUS[@]}"; do [ "${STATUS[$name]}" = ok ] || failed=1; done
exit $failed
