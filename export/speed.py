"""A short FP32-vs-INT8 timing on the exporting machine, run in its own process so no PyTorch thread
pool competes with the runtimes: ``python -m edgekd.export.speed JOB.json`` prints a JSON result.

It measures a few hundred milliseconds per model and batch size, interleaving the two models so a
noisy neighbour slows both alike. It is a warning light, not a benchmark (that is ``edgekd bench``).
"""

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Tuple

import numpy as np

from ..base.telemetry import switch_off
from ..bundle.sessions import open_model
from .records import SpeedRow

BATCHES = (1, 32)
BUDGET_S = 0.25  # per model and batch size
# INT8 counts as faster only when it beats FP32 by more than timing noise.
FASTER = 1.1


@dataclass
class SpeedJob:
    """What the timing process is asked to time: an INT8 model file and its FP32 counterpart, on inputs of
    ``shape`` (channels, height, width); handed over as a JSON file."""

    format: str
    int8_path: str
    fp32_format: str
    fp32_path: str
    shape: List[int]

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def read(cls, path: str) -> "SpeedJob":
        with open(path) as f:
            return cls(**json.load(f))


def _median(values: List[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


Run = Callable[[np.ndarray], np.ndarray]


def time_pair(fp32: Run, int8: Run, batch: np.ndarray) -> Tuple[float, float]:
    """Median ms per call of each model (FP32, INT8) on the same batch, interleaved call by call."""
    fp32(batch), int8(batch), fp32(batch), int8(batch)  # warm-up
    times: Tuple[List[float], List[float]] = ([], [])
    spent = 0.0
    while spent < 2 * BUDGET_S and len(times[0]) < 2000:
        for run, kept in ((fp32, times[0]), (int8, times[1])):
            t0 = time.perf_counter()
            run(batch)
            dt = time.perf_counter() - t0
            kept.append(dt * 1000)
            spent += dt
    return _median(times[0]), _median(times[1])


def measure(job: SpeedJob) -> List[SpeedRow]:
    fp32, _ = open_model(job.fp32_path, job.fp32_format)
    int8, _ = open_model(job.int8_path, job.format)
    rng = np.random.default_rng(0)
    rows = []
    for b in BATCHES:
        batch = rng.standard_normal((b, *job.shape), dtype=np.float32)
        fp32_ms, int8_ms = time_pair(fp32, int8, batch)
        rows.append(SpeedRow(batch_size=b, fp32_ms=round(fp32_ms, 4), int8_ms=round(int8_ms, 4),
                             speedup=round(fp32_ms / int8_ms, 3)))
    return rows


def main(job_path: str) -> None:
    switch_off()  # an edgekd process: OpenVINO telemetry off before the runtime is imported
    print(json.dumps([row.to_dict() for row in measure(SpeedJob.read(job_path))]))


if __name__ == "__main__":
    main(sys.argv[1])
