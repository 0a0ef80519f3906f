"""``edgekd bench``: every (model, backend, device) in its own long-lived worker process, on the same
preprocessed held-out images, timed in interleaved rounds; rows, report, plots."""

import json
import logging
import os
import re
import sys
import tempfile
import time

from .. import EdgeKDError
from .backends import BACKENDS, unsupported
from .process import WorkerProcess
from .stats import schedule, split_runs, summarize

log = logging.getLogger(__name__)

NATIVE_BACKEND = {"checkpoint": "torch", "onnx": "onnxruntime", "openvino": "openvino"}
DEVICE_FORMS = ("cpu, cuda, cuda:N, openvino:CPU, openvino:GPU, openvino:NPU, openvino:AUTO, "
                "ssh://[user@]host[:port][/python]")
ACCURACY_BATCH = 64
SETTLE_S = 0.2  # pause between visits so the last worker's spinning threads go idle before the next is timed
CHECK_S = 0.05  # untimed calls before and after each visit that read the machine's state (see Worker.check)
EXTRA_ROUNDS = 2  # --remeasure-slow: at most this many times --rounds extra rounds
EXPORT_VAL_IMAGES = 200
PROFILE_RUNS = 20  # --profile: profiled calls per row and batch size (operator shares settle within a few)


def check_device(device):
    """Refuse a device name that is not a form bench knows (an unavailable one becomes a row instead)."""
    if device.startswith("ssh://"):
        return device
    if device in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) or re.fullmatch(r"openvino:[A-Z]+[.\w]*", device):
        return device
    raise EdgeKDError(f"unknown device {device!r}: choose from {DEVICE_FORMS}")


def describe(path):
    """What a MODEL argument is: a checkpoint (.pt) or a bundle folder, with its size, params and FLOPs."""
    from ..core.checkpoint import load_checkpoint
    from ..core.data import InputSpec
    from ..bundle.manifest import read_manifest

    name = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        m = read_manifest(path)
        if m["format"] not in NATIVE_BACKEND:
            raise EdgeKDError(f"bundle {path!r} has format {m['format']!r}; bench runs onnx and openvino bundles")
        size = sum(os.path.getsize(os.path.join(path, f)) for f in m["files"] if os.path.isfile(os.path.join(path, f)))
        return {"model": name, "path": path, "kind": m["format"], "precision": m["precision"], "arch": m.get("model"),
                "params": m.get("params"), "flops": m.get("flops"), "size_mb": size / 1e6,
                "input": InputSpec(m["input"]["shape"][1], *m["input"]["resize"], m["input"]["mean"], m["input"]["std"]),
                "classes": m["classes"], "data": m.get("data"), "static_batch": _static_batch(m)}
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        return {"model": name[:-3] if name.endswith(".pt") else name, "path": path, "kind": "checkpoint",
                "precision": "fp32", "arch": ckpt["model"], "params": ckpt.get("params"), "flops": ckpt.get("flops"),
                "size_mb": os.path.getsize(path) / 1e6, "input": InputSpec.from_dict(ckpt["input"]),
                "classes": ckpt["classes"], "data": ckpt.get("data")}
    raise EdgeKDError(f"model {path!r} does not exist (expected a .pt checkpoint or a bundle folder)")


def _static_batch(manifest):
    from ..bundle.runner import static_batch

    return static_batch(manifest)


def _static_batch_status(jobs, batch_sizes):
    """A bundle with a static batch (``edgekd export --target arm64`` for OpenVINO) is timed at that batch only."""
    from ..bundle.runner import unsupported_batch

    for job in jobs:
        n = job.get("static_batch")
        if n:
            job["batch_status"] = {b: unsupported_batch(n, b) for b in batch_sizes if b != n}


# One timed batch in a worker: the input (and one contiguous float32 copy a runtime may make) plus every
# intermediate tensor of one forward pass (an upper bound: runtimes reuse buffers). Refused when it would
# take more than this share of the memory available now, so the machine is not driven into swap.
MEMORY_SHARE = 0.5


def check_batch_memory(described, batch_sizes):
    """Refuse, before any worker starts, a batch size whose inputs and activations cannot fit in memory."""
    available = available_memory()
    if not available:
        return
    largest = max(batch_sizes)
    for d in described:
        per_image = 2 * 4 * d["input"].channels * d["input"].height * d["input"].width + (activation_bytes(d) or 0)
        need = largest * per_image
        if need > MEMORY_SHARE * available:
            fits = int(MEMORY_SHARE * available // per_image)
            raise EdgeKDError(f"--batch-sizes {largest} needs about {need / 1e9:.1f} GB for {d['model']} (inputs and "
                              f"activations of one batch) but {available / 1e9:.1f} GB of memory is available (half may "
                              f"be used): the largest batch that fits is {fits}")


def available_memory():
    """Bytes of memory available to new allocations now (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(d):
    """Bytes of all intermediate tensors of one image's forward pass (float32), or None when unknown."""
    try:
        if d["kind"] == "checkpoint":
            return _checkpoint_activations(d["path"])
        m = read_manifest_of(d["path"])
        path = os.path.join(d["path"], m["model_file"])
        return _onnx_activations(path) if d["kind"] == "onnx" else _openvino_activations(path)
    except Exception as e:  # an estimate only: a model this cannot read fails later with its own message
        log.debug("no activation estimate for %s: %s", d["path"], e)
        return None


def read_manifest_of(folder):
    from ..bundle.manifest import read_manifest

    return read_manifest(folder)


def _checkpoint_activations(path):
    import torch

    from ..core.checkpoint import load_model
    from ..core.data import InputSpec

    model, ckpt = load_model(path)
    spec = InputSpec.from_dict(ckpt["input"])
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + _numel(out)))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, spec.channels, spec.height, spec.width))
    finally:
        for h in hooks:
            h.remove()
    return 4 * total[0]


def _numel(out):
    if hasattr(out, "numel"):
        return out.numel()
    return sum(_numel(o) for o in out) if isinstance(out, (list, tuple)) else 0


def _onnx_activations(path):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
    total = 0
    for value in list(model.graph.value_info) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in value.type.tensor_type.shape.dim]
        total += 4 * _product(dims)
    return total


def _openvino_activations(path):
    """From the IR's XML: every layer's output ports list their dimensions (-1 for the dynamic batch)."""
    import xml.etree.ElementTree as ET

    total = 0
    for layer in ET.parse(path).getroot().iter("layer"):
        for port in layer.findall("./output/port"):
            dims = [int(d.text) for d in port.findall("dim")]
            total += 4 * _product([max(1, d) for d in dims])
    return total


def _product(values):
    result = 1
    for v in values:
        result *= v
    return result


def plan_jobs(described, backends, devices):
    """One job per (model, backend, device) that makes sense; ``status`` holds why a job cannot run.

    A checkpoint runs in ONNX Runtime or OpenVINO through an ONNX file exported for the benchmark.
    Without ``backends`` every model runs in its own format's runtime.
    """
    if backends:
        for b in backends:
            BACKENDS.get(b)
    names = _unique([d["model"] for d in described])
    jobs = []
    for d, name in zip(described, names):
        readable = [b for b in BACKENDS.names() if d["kind"] in BACKENDS.meta(b)["reads"] or
                    (d["kind"] == "checkpoint" and "onnx" in BACKENDS.meta(b)["reads"])]
        chosen = [b for b in backends if b in readable] if backends else [NATIVE_BACKEND[d["kind"]]]
        # A model none of the listed backends can read still gets its rows, saying so.
        what = "a checkpoint" if d["kind"] == "checkpoint" else f"an {d['kind']} bundle"
        for backend in chosen or backends:
            reason = None if chosen else f"{backend} cannot run {what} (it runs in {', '.join(readable)})"
            for device in _devices_for(d, devices):
                status = _ssh_status(d, backend, device) if device.startswith("ssh://") else unsupported(backend, device)
                jobs.append({**d, "model": name, "backend": backend, "device": device, "status": reason or status})
    return jobs


def _devices_for(d, devices):
    """Checkpoints are measured here (SSH devices have no torch): on the local devices given, else the CPU."""
    if d["kind"] != "checkpoint":
        return devices
    return [dev for dev in devices if not dev.startswith("ssh://")] or ["cpu"]


def _ssh_status(d, backend, device):
    """On an SSH device only bundles run, each in its own runtime (the device has no torch)."""
    if backend != NATIVE_BACKEND[d["kind"]]:
        return f"on {device} a {d['kind']} bundle runs in {NATIVE_BACKEND[d['kind']]} only"
    return None


def _unique(names):
    seen, out = {}, []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


def parse_cpus(text):
    """``0``, ``0,1`` or ``0-3`` -> sorted CPU ids, which must be ones this process may use."""
    cpus = set()
    try:
        for part in str(text).split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise EdgeKDError(f"--cpus {text!r} is not a CPU list; use e.g. 0, 0,1 or 0-3") from None
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise EdgeKDError(f"--cpus {text!r} names CPUs this process cannot use; allowed: "
                          f"{','.join(map(str, sorted(allowed)))}")
    return sorted(cpus)


def run_bench(models, out, devices=("cpu",), data=None, data_root=None, backends=None, batch_sizes=(1,), warmup=20,
              runs=200, rounds=5, max_time=30.0, min_time=2.0, remeasure_slow=0.15, threads=None, cpus=None,
              limit=None, max_drop=0.01, progress=True, compare=None, compare_tolerance=0.10, ssh_config=None,
              ssh_timeout=600, profile=False):
    """Benchmark ``models`` (the first is the reference, the teacher); write the results into ``out``.

    Returns the result dict plus ``table`` (markdown) and ``comparison`` (text, when ``compare`` is given).
    """
    from .report import compare_results, load_results, table
    from ..base.outdir import temp_prefix

    if not max_drop >= 0:  # NaN must not switch the gate off
        raise EdgeKDError(f"max_drop must be 0 or more, got {max_drop}")

    devices = [check_device(d) for d in devices]
    targets = _ssh_targets(devices, ssh_config, ssh_timeout)
    old = load_results(compare) if compare else None
    cpus = parse_cpus(cpus) if cpus is not None else None
    threads = threads or (len(cpus) if cpus else None)
    described = [describe(p) for p in models]
    check_batch_memory(described, batch_sizes)
    jobs = plan_jobs(described, backends, devices)
    _static_batch_status(jobs, batch_sizes)
    data_spec = data or described[0]["data"] or "digits"
    settings = {"batch_sizes": list(batch_sizes), "warmup": warmup, "runs": runs, "rounds": min(rounds, runs),
                "max_time_s": max_time, "min_time_s": min(min_time, max_time),
                "remeasure_slow": remeasure_slow, "check_s": CHECK_S if remeasure_slow else 0.0,
                "max_extra_rounds": EXTRA_ROUNDS * min(rounds, runs) if remeasure_slow else 0,
                "threads": threads, "cpus": cpus, "limit": limit, "max_drop": max_drop,
                "devices": devices, "backends": backends, "profile": profile}
    env = environment(threads, cpus)
    bar = _progress_bar(jobs, settings, progress)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bench")) as folder:
        try:
            bar.set_postfix_str("preparing test images")
            _prepare(jobs, data_spec, data_root, limit, folder)
            bar.update()
            _measure([j for j in jobs if j["device"] not in targets], folder, settings, bar)
            device_envs = _measure_remote([j for j in jobs if j["device"] in targets], targets, settings, ssh_timeout, bar)
        finally:
            bar.close()
    rows = build_rows(jobs, batch_sizes)
    if profile:
        attach_profiles(rows, jobs)
    mark_best(rows, max_drop)
    env["loadavg_end"] = _loadavg()
    result = {"environment": env, "data": data_spec, "settings": settings, "rows": rows}
    if device_envs:
        result["device_environments"] = device_envs
    comparison = compare_results(old, result, compare, compare_tolerance) if old else None
    write_outputs(out, result, comparison)
    return {**result, "table": table(rows), "comparison": comparison}


def _ssh_targets(devices, ssh_config, timeout):
    """Parse and probe every ssh:// device up front, so an unreachable one fails before any measuring."""
    from ..base import ssh
    from .remote import check_device as probe

    targets = {}
    for device in devices:
        if device.startswith("ssh://"):
            targets[device] = ssh.parse_target(device, ssh_config)
            probe(targets[device], timeout)
    return targets


def _measure_remote(jobs, targets, settings, timeout, bar):
    """Run the bundles on each SSH device (one trip per device and input spec); fill the jobs as local workers do."""
    from .remote import bench_bundles

    per_job = 2 + settings["rounds"] * len(settings["batch_sizes"])
    envs, groups = {}, {}
    for job in jobs:
        if job["status"]:
            bar.update(per_job if job.get("images") else 0)
            continue
        groups.setdefault((job["device"], job["images"], job["labels"]), []).append(job)
    for (device, images, labels), group in groups.items():
        bar.set_postfix_str(f"{len(group)} bundle(s) on {targets[device]}")
        env, results = bench_bundles(targets[device], [(j["model"], j["run_path"]) for j in group], images, labels,
                                     settings["batch_sizes"], settings["warmup"], settings["runs"],
                                     settings["threads"], timeout)
        envs[device] = env
        for job in group:
            r = results[job["model"]]
            job.update(status=r["status"], accuracy=r.get("accuracy"), load=r.get("load"), times=r.get("times", {}))
            job.setdefault("batch_status", {}).update(r.get("batch_status") or {})
            if env.get("emulated"):  # detected on the device by the runner: its timings are not latency
                job["emulated"] = env["emulated"]
            job["round_p50"] = {b: [summarize(t, b)["latency_ms"]["p50"]] for b, t in job["times"].items()}
            bar.update(per_job)
    return envs


def _prepare(jobs, data_spec, data_root, limit, folder):
    """Preprocessed test images per input spec (shared by every job with it) and ONNX files for checkpoints."""
    images, onnx = {}, {}
    for i, job in enumerate(jobs):
        if job["status"]:
            continue
        key = json.dumps([job["input"].channels, job["input"].height, job["input"].width, job["input"].mean,
                          job["input"].std])
        if key not in images:
            images[key] = _save_images(data_spec, data_root, job["input"], limit, os.path.join(folder, f"images{len(images)}"))
        job["images"], job["labels"], classes, job["images_n"] = images[key]
        if len(job["classes"]) != len(classes):
            job["status"] = f"model has {len(job['classes'])} classes, data {data_spec!r} has {len(classes)}"
        elif job["kind"] == "checkpoint" and job["backend"] != "torch":
            if job["path"] not in onnx:
                onnx[job["path"]] = _export_onnx(job["path"], data_spec, data_root, os.path.join(folder, f"onnx{i}"))
            job["run_path"], reason = onnx[job["path"]]
            job["status"] = reason
            if not reason:
                job["size_mb"] = sum(os.path.getsize(os.path.join(job["run_path"], f))
                                     for f in os.listdir(job["run_path"]) if f != "manifest.json") / 1e6
        else:
            job["run_path"] = job["path"]


def _save_images(data_spec, data_root, spec, limit, stem):
    import numpy as np

    from ..core.data import load_data, take_images

    data = load_data(data_spec, data_root, input_spec=spec)
    images, labels = take_images(data.test, limit)
    np.save(stem + ".npy", images.numpy())
    np.save(stem + "-labels.npy", labels.numpy())
    return stem + ".npy", stem + "-labels.npy", data.classes, len(labels)


def _export_onnx(checkpoint, data_spec, data_root, out):
    """An ONNX FP32 file of a checkpoint, checked against PyTorch, for running it in ONNX Runtime or OpenVINO."""
    from ..export.pipeline import ExportOptions, export_checkpoint

    try:
        export_checkpoint(checkpoint, ExportOptions(fmt="onnx", precision="fp32", out=out, data=data_spec,
                                                    data_root=data_root, val_size=EXPORT_VAL_IMAGES, progress=False))
    except EdgeKDError as e:
        return None, f"ONNX export for this backend failed: {e}"
    return out, None


def _progress_bar(jobs, settings, progress):
    """One bar over the whole benchmark: preparing images, then per job a load, an accuracy pass and its visits."""
    from ..base.progress import bar

    per_job = 2 + settings["rounds"] * len(settings["batch_sizes"])
    total = 1 + per_job * sum(1 for j in jobs if not j["status"])
    return bar(total=total, desc="bench", unit="step", disable=not progress, leave=True)


def _measure(jobs, folder, settings, bar):
    """Start and load every runnable job's worker, take accuracy, then time in interleaved rounds."""
    per_job = 2 + settings["rounds"] * len(settings["batch_sizes"])
    live = []
    try:
        for i, job in enumerate(jobs):
            if job["status"]:
                bar.update(per_job if job.get("images") else 0)  # failed in _prepare: its steps are skipped
                continue
            bar.set_postfix_str(f"loading {_label(job)}")
            worker = WorkerProcess(os.path.join(folder, f"worker{i}.log"), settings["cpus"])
            try:
                job["load"] = worker.request("load", backend=job["backend"], path=os.path.abspath(job["run_path"]),
                                             device=job["device"], threads=settings["threads"],
                                             images=job["images"], labels=job["labels"])
                bar.update()
                bar.set_postfix_str(f"accuracy {_label(job)}")
                job["accuracy"] = worker.request("accuracy", batch_size=ACCURACY_BATCH)
                live.append((job, worker))
            except EdgeKDError as e:
                job["status"] = str(e)
                job["close"] = worker.close()
                bar.update(per_job - 1 + ("load" not in job))
                continue
            bar.update()
        _timed_rounds(live, settings, bar)
        if settings.get("profile"):
            _profile(live, settings, bar)
    finally:
        for job, worker in live:
            job["close"] = worker.close()


def _timed_rounds(live, settings, bar):
    """The planned interleaved rounds, then extra rounds for the visits a slow spell of the machine spoiled."""
    rounds, batch_sizes = settings["rounds"], settings["batch_sizes"]
    runs = split_runs(settings["runs"], rounds)
    for r, b, k in schedule(len(live), batch_sizes, rounds):
        _visit(live[k], b, r, runs[r], settings, bar)
    tolerance = settings.get("remeasure_slow") or 0.0
    for extra in range(settings.get("max_extra_rounds", 0) if tolerance else 0):
        short = [(k, b) for b in batch_sizes for k, (job, _) in enumerate(live)
                 if b not in job.get("batch_status", {}) and kept_visits(job["visits"][b], tolerance).count(True) < rounds]
        if not short:
            break
        bar.total = (bar.total or 0) + len(short)
        for k, b in short[extra % len(short):] + short[:extra % len(short)]:  # rotate, as planned rounds do
            _visit(live[k], b, rounds + extra, runs[-1], settings, bar)
    for job, _ in live:
        _keep(job, tolerance)


def _visit(entry, b, r, runs, settings, bar):
    """One visit: warm-up, a check of the machine's state, ``runs`` timed calls (or ``--min-time``'s share), a check."""
    job, worker = entry
    rounds = settings["rounds"]
    bar.set_postfix_str(f"round {r + 1}/{rounds} batch {b} {_label(job)}" if r < rounds else
                        f"extra round {r - rounds + 1} batch {b} {_label(job)}")
    job.setdefault("visits", {}).setdefault(b, [])
    job.setdefault("batch_status", {})
    if b not in job["batch_status"]:
        time.sleep(SETTLE_S)
        try:
            answer = worker.request("time", batch_size=b, runs=runs,
                                    # later visits re-warm briefly: caches went cold while other workers ran
                                    warmup=settings["warmup"] if r == 0 else max(2, settings["warmup"] // rounds),
                                    max_s=settings["max_time_s"] / rounds, min_s=settings.get("min_time_s", 0.0) / rounds,
                                    check_s=settings.get("check_s", 0.0))
            job["visits"][b].append({"times_ms": answer["times_ms"], "check_ms": answer.get("check_ms"),
                                     "p50_ms": summarize(answer["times_ms"], b)["latency_ms"]["p50"]})
        except EdgeKDError as e:
            job["batch_status"][b] = f"failed at batch {b}: {e}"
    bar.update()


def _profile(live, settings, bar):
    """--profile, after all timing: each row's per-operator times from a second session with profiling on."""
    bar.total = (bar.total or 0) + len(live) * len(settings["batch_sizes"])
    for job, worker in live:
        job["profile"] = {}
        for b in settings["batch_sizes"]:
            bar.set_postfix_str(f"profiling batch {b} {_label(job)}")
            try:
                job["profile"][b] = worker.request("profile", batch_size=b, runs=min(settings["runs"], PROFILE_RUNS))
            except EdgeKDError as e:
                job["profile"][b] = f"not profiled: {e}"
            bar.update()


def attach_profiles(rows, jobs):
    """Each row's profile (by operator type and top layers, with precisions), or None and why in profile_note."""
    for row in rows:
        got = (job_of(jobs, row).get("profile") or {}).get(row["batch_size"])
        row["profile"] = got if isinstance(got, dict) else None
        if row["profile"] is None:
            row["profile_note"] = got or ("not profiled: " + (row["status"] if row["status"] != "ok" else
                                                              "rows on SSH devices are not profiled"))


def kept_visits(visits, tolerance):
    """Which visits count: those the machine ran at full speed throughout.

    A visit's slowness is the larger of two ratios: its median over the fastest median among the row's
    visits, and the slower of its two checks (untimed calls just before and after the timed ones) over
    the fastest such check. A visit counts when that is within ``tolerance``; the least slow visit always
    counts. A slow spell of a shared machine slows every call of a visit, timed or not; a model's own
    spread within a visit does not move its median.
    """
    if not tolerance or not visits:
        return [True] * len(visits)
    checks = [max(v["check_ms"]) if v.get("check_ms") else None for v in visits]
    known = [c for c in checks if c is not None]
    p50_floor = min(v["p50_ms"] for v in visits)
    slowness = [max(v["p50_ms"] / p50_floor, c / min(known) if c is not None else 1.0)
                for v, c in zip(visits, checks)]
    kept = [s <= 1 + tolerance for s in slowness]
    kept[slowness.index(min(slowness))] = True
    return kept


def _keep(job, tolerance):
    """The timings of the kept visits become the row's; every visit stays on record with its check."""
    job["times"], job["round_p50"], job["visit_log"] = {}, {}, {}
    for b, visits in job.get("visits", {}).items():
        kept = kept_visits(visits, tolerance)
        job["times"][b] = [t for v, k in zip(visits, kept) if k for t in v["times_ms"]]
        job["round_p50"][b] = [v["p50_ms"] for v, k in zip(visits, kept) if k]
        job["visit_log"][b] = [{"p50_ms": v["p50_ms"], "check_ms": v["check_ms"], "kept": k} for v, k in zip(visits, kept)]


def _label(job):
    return f"{job['model']} ({job['backend']}, {job['device']})"


ROW_FROM_JOB = ("model", "backend", "precision", "device", "arch", "params", "flops", "size_mb", "path")
ROW_FROM_LOAD = ("first_inference_ms", "load_mb", "threads", "affinity", "runtime_device", "runtime_precision", "gpu")


def build_rows(jobs, batch_sizes):
    """One row per job and batch size, with speedup, top-1 delta and agreement against the first job."""
    ref = jobs[0]
    rows = []
    for job in jobs:
        acc, load, close = job.get("accuracy") or {}, job.get("load") or {}, job.get("close") or {}
        for b in batch_sizes:
            row = {k: job.get(k) for k in ROW_FROM_JOB}
            row.update(batch_size=b, images=job.get("images_n"), top1=acc.get("top1"), top5=acc.get("top5"))
            if job.get("emulated"):
                row["emulated"] = job["emulated"]
            row.update({k: load[k] for k in ROW_FROM_LOAD if k in load})
            row.update({k: close[k] for k in ("peak_rss_mb", "gpu_peak_mb") if k in close})
            times = (job.get("times") or {}).get(b)
            status = job["status"] or (job.get("batch_status") or {}).get(b)
            if status or not times:
                row.update(latency_ms=None, throughput_ips=None, status=status or "no timings")
            else:
                row.update(summarize(times, b), round_p50_ms=job["round_p50"][b], status="ok")
                if job.get("visit_log", {}).get(b):
                    row["visits"] = job["visit_log"][b]
            rows.append(row)
    refs = {r["batch_size"]: r for r in rows[:len(batch_sizes)]}
    for row in rows:
        _against_reference(row, refs[row["batch_size"]], job_of(jobs, row), ref)
    return rows


def job_of(jobs, row):
    return next(j for j in jobs if (j["model"], j["backend"], j["device"]) == (row["model"], row["backend"], row["device"]))


def _against_reference(row, ref_row, job, ref_job):
    # an emulated device's timings are not latency: no speedup against a real one (nor the other way)
    timed = row["status"] == "ok" and ref_row["status"] == "ok" and not row.get("emulated") and not ref_row.get("emulated")
    row["speedup_vs_teacher"] = ref_row["latency_ms"]["p50"] / row["latency_ms"]["p50"] if timed else None
    both = row["top1"] is not None and ref_row["top1"] is not None
    row["top1_delta_vs_teacher"] = row["top1"] - ref_row["top1"] if both else None
    mine = (job.get("accuracy") or {}).get("predictions")
    theirs = (ref_job.get("accuracy") or {}).get("predictions")
    if mine is not None and theirs is not None and len(mine) == len(theirs):
        row["agreement_vs_teacher"] = sum(a == b for a, b in zip(mine, theirs)) / len(mine)
    else:
        row["agreement_vs_teacher"] = None


def mark_best(rows, max_drop):
    """Per batch size, the fastest row other than the reference whose top-1 is within ``max_drop`` of it."""
    for b in sorted({r["batch_size"] for r in rows}):
        group = [r for r in rows if r["batch_size"] == b]
        ref = group[0]
        for r in group:
            r["best"] = False
        if ref["top1"] is None:
            continue
        fit = [r for r in group[1:] if r["status"] == "ok" and not r.get("emulated") and r["top1"] is not None
               and r["top1"] >= ref["top1"] - max_drop]
        if fit:
            min(fit, key=lambda r: r["latency_ms"]["p50"])["best"] = True


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _git_commit():
    """The commit of the edgekd source tree this runs from (None outside a git checkout), '+dirty' if edited."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def environment(threads, cpus):
    """The machine and software a result was measured on."""
    import platform
    from datetime import datetime, timezone

    from .. import __version__
    from ..bundle.manifest import library_versions

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = library_versions(("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy",
                                 "matplotlib"))
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cpus": sorted(os.sched_getaffinity(0)),
            "threads_requested": threads, "cpus_pinned": cpus, "platform": platform.platform(),
            "python": platform.python_version(), "edgekd": __version__, "git_commit": _git_commit(),
            "versions": versions, "command": " ".join(["edgekd"] + sys.argv[1:]),
            "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "loadavg_start": _loadavg()}


def write_outputs(out, result, comparison=None):
    """results.json, results.csv, report.md, the two plots (and compare.md), each written atomically."""
    from ..core.checkpoint import atomic_write
    from .report import csv_text, markdown_report, plot_accuracy_latency, plot_latency, plot_profile

    os.makedirs(out, exist_ok=True)
    texts = {"results.json": json.dumps(result, indent=2) + "\n", "results.csv": csv_text(result["rows"]),
             "report.md": markdown_report(result, comparison)}
    if comparison:
        texts["compare.md"] = comparison + "\n"
    for name, text in texts.items():
        atomic_write(os.path.join(out, name), lambda tmp, text=text: _write_text(tmp, text))
        os.chmod(os.path.join(out, name), 0o644)  # the temporary file was private; a report is for sharing
    plots = [("accuracy_vs_latency.png", plot_accuracy_latency), ("latency.png", plot_latency)]
    if any("profile" in r for r in result["rows"]):
        plots.append(("profile.png", plot_profile))
    for name, plot in plots:
        try:
            atomic_write(os.path.join(out, name), lambda tmp, plot=plot: plot(result["rows"], tmp))
            os.chmod(os.path.join(out, name), 0o644)
        except ImportError:
            log.warning("matplotlib is not installed; %s not written", name)


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)
