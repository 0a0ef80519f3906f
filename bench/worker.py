"""One model in its own process, driven over a pipe: ``python -m edgekd.bench.worker [--cpus 0,1]``.

The process stays alive for the whole benchmark, so the model is loaded and compiled once while
the parent visits the workers in turn (interleaved rounds). Each request is one JSON line on
stdin and gets one JSON line back:

- ``{"op": "load", backend, path, device, threads, images, labels}`` -> first_inference_ms, load_mb, threads, ...
- ``{"op": "accuracy", "batch_size": N}`` -> top1, top5, predictions (over every image)
- ``{"op": "time", batch_size, runs, warmup, min_s, max_s, check_s}`` -> times_ms (one per call, each on different
  images) and, when ``check_s`` is given, check_ms: the median of untimed calls just before and just after them
- ``{"op": "profile", batch_size, runs}`` -> per-operator times (bench/profile.py) from a second session with
  profiling on, asked for after timing so the timed session is never slowed by it
- ``{"op": "close"}`` -> peak_rss_mb (and gpu_peak_mb on CUDA); the process then exits

A failure answers ``{"error": reason}``. Library output goes to stderr, never into the protocol.
"""

import importlib
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from ..base.errors import EdgeKDError
from ..base.telemetry import switch_off
from ..bundle.rows import JSON, Accuracy, Load
from .backends import BACKENDS, backend_module
from .profile import profile_bundle
from .protocol import AccuracyRequest, CloseAnswer, Envelope, LoadRequest, ProfileRequest, TimeAnswer, TimeRequest

IN_MEMORY_LIMIT = 1 << 30  # bytes of preprocessed images a worker holds in memory


def _status_mb(field: str) -> Optional[float]:
    """A memory figure of this process from /proc/self/status (Linux), in MB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith(field + ":"))
        return int(line.split()[1]) * 1024 / 1e6
    except (OSError, StopIteration, ValueError):
        return None


def rss_mb() -> Optional[float]:
    """Resident memory now."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> Optional[float]:
    """Peak resident memory of this process image (VmHWM; unlike ru_maxrss it does not inherit the parent's)."""
    return _status_mb("VmHWM")


class Worker:
    """Holds one loaded model and answers the parent's requests: each method reads its request's JSON object into
    the request's record and returns its answer's JSON object."""

    def __init__(self) -> None:
        self.run: Optional[Callable[[Any], Any]] = None
        self.cursor: Dict[int, int] = {}  # batch size -> next batch index, so every visit sees new images
        self.images: Any = None
        self.labels: Any = None
        self.device, self.backend, self.path = "cpu", "", ""
        self.threads: Optional[int] = None

    def load(self, raw: JSON) -> JSON:
        import numpy as np

        req = LoadRequest.from_json(raw)
        # In memory, so no timed call pays a page fault; a very large split is memory-mapped instead.
        big = os.path.getsize(req.images) > IN_MEMORY_LIMIT
        self.images = np.asarray(np.load(req.images, mmap_mode="c" if big else None))
        self.labels = np.load(req.labels)
        self.device, self.backend, self.path, self.threads = req.device, req.backend, req.path, req.threads
        importlib.import_module(backend_module(req.backend))  # import time is not the model's
        before = rss_mb()
        start = time.perf_counter()
        self.run, info = BACKENDS.get(req.backend)(req.path, req.threads, req.device)
        np.asarray(self.run(np.ascontiguousarray(self.images[:1])))
        first_ms = (time.perf_counter() - start) * 1000
        peak = peak_rss_mb()
        return Load.from_json({**info, "first_inference_ms": first_ms,
                               "load_mb": None if peak is None or before is None else peak - before,
                               "affinity": sorted(os.sched_getaffinity(0))}).to_json()

    def accuracy(self, raw: JSON) -> JSON:
        import numpy as np

        b = AccuracyRequest.from_json(raw).batch_size
        run = self._loaded()
        logits = np.concatenate([np.asarray(run(self.images[i:i + b])) for i in range(0, len(self.images), b)])
        preds = logits.argmax(1)
        top5 = np.argsort(-logits, axis=1)[:, :5]
        return Accuracy(top1=float((preds == self.labels).mean()),
                        top5=float((top5 == self.labels[:, None]).any(1).mean()),
                        predictions=preds.tolist(),
                        nonfinite=int((~np.isfinite(logits)).any(1).sum())).to_json()  # NaN rows would argmax to 0

    def _loaded(self) -> Callable[[Any], Any]:
        if self.run is None:
            raise EdgeKDError("no model is loaded in this worker")
        return self.run

    def batches(self, batch_size: int, count: int) -> List[Any]:
        """``count`` batches of real images, continuing where the last visit stopped (views, no copies)."""
        import numpy as np

        n = len(self.images)
        first = self.cursor.get(batch_size, 0)
        self.cursor[batch_size] = first + count
        if n < batch_size:  # fewer images than one batch: every batch holds them all, wrapped (one copy)
            return [np.take(self.images, range(batch_size), axis=0, mode="wrap")] * count
        per_pass = n // batch_size
        return [self.images[(k % per_pass) * batch_size:(k % per_pass + 1) * batch_size]
                for k in range(first, first + count)]

    def time(self, raw: JSON) -> JSON:
        """Warm-up calls, then timed calls: at least ``runs`` calls covering at least ``min_s`` seconds (a
        sub-millisecond model gets thousands of calls, so its percentiles do not rest on a few milliseconds
        of machine state), stopping once ``max_s`` is spent (after at least 3 calls)."""
        req = TimeRequest.from_json(raw)
        b, run = req.batch_size, self._loaded()
        for x in self.batches(b, req.warmup):
            run(x)
        check_s = req.check_s or 0.0
        before = self.check(b, check_s) if check_s else None
        times = self._timed(b, req.runs, req.min_s, req.max_s)
        after = self.check(b, check_s) if check_s else None
        checks = [before, after] if before is not None and after is not None else None
        return TimeAnswer(times_ms=times, check_ms=checks).to_json()

    def _timed(self, b: int, runs: int, min_s: Optional[float], max_s: Optional[float]) -> List[float]:
        run = self._loaded()
        limit, floor = max_s or float("inf"), min(min_s or 0.0, max_s or float("inf"))
        times: List[float] = []
        spent, chunk = 0.0, runs
        while True:
            for x in self.batches(b, chunk):
                t0 = time.perf_counter()
                run(x)
                dt = time.perf_counter() - t0
                times.append(dt * 1000)
                spent += dt
                if spent >= limit and len(times) >= 3:
                    return times
            if spent >= floor:
                return times
            chunk = max(16, runs // 4)

    def check(self, b: int, seconds: float) -> float:
        """The machine's state, read off this model: the median of untimed calls over ``seconds`` (at least 3).

        A shared VM has slow spells of seconds (how the host serves its CPUs varies): every model slows alike.
        The parent compares these checks across a model's visits and measures a visit again when it was slow.
        """
        times: List[float] = []
        end, run = time.perf_counter() + seconds, self._loaded()
        while len(times) < 3 or time.perf_counter() < end:
            x = self.batches(b, 1)[0]
            t0 = time.perf_counter()
            run(x)
            times.append((time.perf_counter() - t0) * 1000)
        return sorted(times)[len(times) // 2]

    def profile(self, raw: JSON) -> JSON:
        req = ProfileRequest.from_json(raw)
        if self.backend not in ("onnxruntime", "openvino") or self.device not in ("cpu", "openvino:CPU"):
            raise EdgeKDError("profiled in ONNX Runtime and OpenVINO on the CPU only; this row runs "
                              f"{self.backend} on {self.device}")
        return profile_bundle(self.path, self.images, req.batch_size, req.runs, self.threads, self.backend).to_json()

    def close(self, raw: JSON) -> JSON:
        gpu = None
        if "torch" in sys.modules and self.device.startswith("cuda"):  # loaded already: no import cost
            import torch

            gpu = torch.cuda.max_memory_allocated() / 1e6 if torch.cuda.is_available() else None
        return CloseAnswer(peak_rss_mb=peak_rss_mb(), gpu_peak_mb=gpu).to_json()


def answer(worker: Worker, op: str, req: JSON) -> JSON:
    """The worker's answer to one request, or ``{"error": reason}``."""
    try:
        return getattr(worker, op)(req)
    except EdgeKDError as e:
        return {"error": str(e)}
    except Exception as e:  # a failing model becomes a row with its reason, never a crashed benchmark
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"error": f"{type(e).__name__}: {first}".rstrip(": ")}


def main(argv: List[str]) -> None:
    """Answer requests from stdin until ``close``."""
    switch_off()  # a worker is an edgekd process: OpenVINO telemetry off before any runtime is imported
    if len(argv) == 2 and argv[0] == "--cpus":
        # Pin before numpy and the runtimes start their thread pools, so they size themselves to these cores.
        os.sched_setaffinity(0, {int(c) for c in argv[1].split(",")})
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol
    worker = Worker()
    for line in sys.stdin:
        req = json.loads(line)
        op = Envelope.from_json(req).op
        proto.write(json.dumps(answer(worker, op, req)) + "\n")
        if op == "close":
            break


if __name__ == "__main__":
    main(sys.argv[1:])
