"""``edgekd bench``: every model in its own worker process, on the same preprocessed held-out images."""

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile

from .. import EdgeKDError
from ..checkpoint import atomic_write
from .backends import BACKENDS
from .report import markdown_report, plot_accuracy_latency, table

log = logging.getLogger(__name__)

BACKEND_OF_FORMAT = {"onnx": "onnxruntime"}
DEVICES = ("cpu", "cuda")
WORKER_TIMEOUT_S = 1800


def describe(path):
    """What a MODEL argument is: a checkpoint for PyTorch or a bundle for its runtime."""
    from ..checkpoint import load_checkpoint
    from ..data import InputSpec
    from ..export.manifest import read_manifest

    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        m = read_manifest(path)
        backend = BACKEND_OF_FORMAT.get(m["format"])
        if backend is None:
            raise EdgeKDError(f"bundle {path!r} has format {m['format']!r}; bench runs {', '.join(BACKEND_OF_FORMAT)}")
        size = sum(os.path.getsize(os.path.join(path, f)) for f in m["files"])
        return {"model": name, "path": path, "backend": backend, "precision": m["precision"], "arch": m.get("model"),
                "params": m.get("params"), "flops": m.get("flops"), "size_mb": size / 1e6,
                "input": InputSpec(m["input"]["shape"][1], *m["input"]["resize"], m["input"]["mean"], m["input"]["std"]),
                "classes": m["classes"], "data": m.get("data")}
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        return {"model": name[:-3] if name.endswith(".pt") else name, "path": path, "backend": "torch",
                "precision": "fp32", "arch": ckpt["model"], "params": ckpt.get("params"), "flops": ckpt.get("flops"),
                "size_mb": os.path.getsize(path) / 1e6,
                "input": InputSpec.from_dict(ckpt["input"]), "classes": ckpt["classes"],
                "data": ckpt.get("data")}
    raise EdgeKDError(f"model {path!r} does not exist (expected a .pt checkpoint or a bundle folder)")


def _prepare_images(data_spec, data_root, spec, limit, folder, cache):
    """Preprocess the test split once per distinct input spec; every model with that spec reads the same file."""
    import numpy as np

    from ..data import load_data, take_images

    key = json.dumps([spec.channels, spec.height, spec.width, spec.mean, spec.std])
    if key not in cache:
        data = load_data(data_spec, data_root, input_spec=spec)
        images, labels = take_images(data.test, limit)
        stem = os.path.join(folder, f"images{len(cache)}")
        np.save(stem + ".npy", images.numpy())
        np.save(stem + "-labels.npy", labels.numpy())
        cache[key] = (stem + ".npy", stem + "-labels.npy", data)
    return cache[key]


def _run_worker(job, folder, index):
    job_path = os.path.join(folder, f"job{index}.json")
    result_path = os.path.join(folder, f"result{index}.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, OPENVINO_TELEMETRY_OPT_OUT="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "edgekd.bench.worker", job_path, result_path],
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {WORKER_TIMEOUT_S} s"}
    if not os.path.isfile(result_path):
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"worker exited with code {proc.returncode}: {last}"}
    with open(result_path) as f:
        return json.load(f)


def environment(threads):
    from ..export.manifest import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads_requested": threads, "platform": platform.platform(),
            "python": platform.python_version(), "versions": library_versions(), "command": " ".join(["edgekd"] + sys.argv[1:])}


def run_bench(models, device="cpu", out=None, data=None, data_root=None, warmup=20, runs=300, threads=None, limit=None,
              ssh_config=None, timeout=600):
    """Benchmark ``models`` (teacher first); write results.json, report.md and a plot into ``out``.

    With ``device="ssh://..."`` every model is measured here on the CPU as usual, and every bundle is
    also measured on that device, its rows beside the local ones.
    """
    remote = None
    if device.startswith("ssh://"):
        from .. import ssh

        from .remote import check_device

        remote, device = ssh.parse_target(device, ssh_config), "cpu"
        check_device(remote, timeout)  # fail fast, before any local measurement
    if device not in DEVICES:
        raise EdgeKDError(f"unknown device {device!r}: choose from {', '.join(DEVICES)}, ssh://[user@]host[:port][/python]")
    described = [describe(p) for p in models]
    data_spec = data or described[0]["data"] or "digits"
    rows, cache = [], {}
    with tempfile.TemporaryDirectory(prefix="edgekd-bench-") as folder:
        for i, d in enumerate(described):
            row = {k: d[k] for k in ("model", "path", "backend", "precision", "arch", "params", "flops", "size_mb")}
            row.update(device=device, batch_size=1)
            images, labels, dataset = _prepare_images(data_spec, data_root, d["input"], limit, folder, cache)
            if len(d["classes"]) != len(dataset.classes):
                row["status"] = f"model has {len(d['classes'])} classes, data {dataset.spec!r} has {len(dataset.classes)}"
            elif device == "cuda" and d["backend"] == "torch" and not _cuda_available():
                row["status"] = "CUDA is not available on this machine"
            else:
                log.info("measuring %s (%s)", d["model"], d["backend"])
                print(f"measuring {d['model']} ({d['backend']}, {d['precision']}) ...", file=sys.stderr, flush=True)
                job = {"path": os.path.abspath(d["path"]), "backend": d["backend"], "device": device, "threads": threads,
                       "images": images, "labels": labels, "warmup": warmup, "runs": runs}
                row.update(_run_worker(job, folder, i))
            row["images"] = len(dataset.test) if limit is None else min(limit, len(dataset.test))
            rows.append(row)
        device_env = _remote_rows(remote, described, rows, data_spec, data_root, limit, folder, cache, warmup, runs,
                                  threads, timeout) if remote else None
    _compare_to_reference(rows)
    result = {"environment": environment(threads), "data": data_spec, "rows": rows}
    if device_env:
        result["device_environment"] = device_env
    _write(out, result)
    return {**result, "table": table(rows)}


def _remote_rows(target, described, rows, data_spec, data_root, limit, folder, cache, warmup, runs, threads, timeout):
    """Bench the bundles on the SSH device, one trip per input spec, and append their rows."""
    from .remote import bench_bundles

    groups = {}
    for d in described:
        if d["backend"] != "torch":
            images, labels, dataset = _prepare_images(data_spec, data_root, d["input"], limit, folder, cache)
            groups.setdefault((images, labels), []).append(d)
    env = None
    for (images, labels), group in groups.items():
        print(f"measuring {', '.join(d['model'] for d in group)} on {target} ...", file=sys.stderr, flush=True)
        env, by_name = bench_bundles(target, [(d["model"], d["path"]) for d in group], images, labels, warmup, runs,
                                     threads, timeout)
        for d in group:
            row = {k: d[k] for k in ("model", "path", "backend", "precision", "arch", "params", "flops", "size_mb")}
            row.update(device=str(target), batch_size=1, **by_name[d["model"]])
            rows.append(row)
    return env


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def _compare_to_reference(rows):
    """Speedup, accuracy delta and prediction agreement against the first row (the teacher)."""
    ref = rows[0]
    ok = ref.get("status") == "ok"
    for row in rows:
        if row.get("status") != "ok" or not ok:
            row.update(speedup_vs_teacher=None, top1_delta_vs_teacher=None, agreement_vs_teacher=None)
            continue
        row["speedup_vs_teacher"] = ref["latency_ms"]["p50"] / row["latency_ms"]["p50"]
        row["top1_delta_vs_teacher"] = row["top1"] - ref["top1"]
        same = [a == b for a, b in zip(row["predictions"], ref["predictions"])]
        row["agreement_vs_teacher"] = sum(same) / len(same) if len(row["predictions"]) == len(ref["predictions"]) else None
    for row in rows:
        row.pop("predictions", None)


def _write(out, result):
    os.makedirs(out, exist_ok=True)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(markdown_report(result))

    atomic_write(os.path.join(out, "results.json"), write_json)
    atomic_write(os.path.join(out, "report.md"), write_md)
    try:
        plot_accuracy_latency(result["rows"], os.path.join(out, "accuracy_vs_latency.png"))
    except ImportError:
        log.warning("matplotlib is not installed; no plot written")
