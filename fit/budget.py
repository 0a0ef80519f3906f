"""The budget expression: ``p50_ms<=5,size_mb<=4,top1>=0.9``, parsed into limits that NaN never passes."""

import math
import re
from dataclasses import dataclass
from typing import Collection, Dict, Optional, Tuple

from .. import EdgeKDError

# key -> (what it measures, the operators it takes)
KEYS = {
    "p50_ms": ("median latency on the device at --batch-size, ms", ("<=", "<")),
    "p90_ms": ("90th-percentile latency on the device at --batch-size, ms", ("<=", "<")),
    "size_mb": ("the bundle's size, MB", ("<=", "<")),
    "mem_mb": ("the runner's peak resident memory on the device, MB", ("<=", "<")),
    "top1": ("top-1 accuracy floor on the test split, 0..1", (">=", ">")),
}
ACCEPTED = ("accepted: comma-separated KEY OP NUMBER terms, e.g. p50_ms<=5,size_mb<=4,top1>=0.9; keys "
            + ", ".join(f"{k} ({'/'.join(ops)})" for k, (_, ops) in KEYS.items()))
_TERM = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([^\s<>=]+)\s*$")
# the keys measured before training (everything but the accuracy floor)
DEVICE_KEYS = ("p50_ms", "p90_ms", "size_mb", "mem_mb")


@dataclass(frozen=True)
class Limit:
    key: str
    op: str
    value: float

    def excess(self, measured: Optional[float]) -> float:
        """How far ``measured`` is past the limit (> 0 misses, <= 0 meets); NaN or None is an infinite miss."""
        if measured is None or not math.isfinite(float(measured)):
            return math.inf
        over = measured - self.value if self.op in ("<=", "<") else self.value - measured
        if self.op in ("<", ">") and over == 0:
            return math.ulp(max(abs(self.value), 1.0))  # a strict bound that is only touched still misses
        return over

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Budget:
    limits: Tuple[Limit, ...]

    def get(self, key: str) -> Optional[Limit]:
        """The limit on ``key``, None when the budget sets none."""
        return next((lim for lim in self.limits if lim.key == key), None)

    def device_limits(self) -> Tuple[Limit, ...]:
        """The limits measured before training (all but the accuracy floor)."""
        return tuple(lim for lim in self.limits if lim.key in DEVICE_KEYS)

    def misses(self, values: Dict[str, Optional[float]], keys: Optional[Collection[str]] = None) -> Dict[str, float]:
        """The limits ``values`` miss (key -> excess, in the key's unit); empty when every one is met."""
        out = {}
        for lim in self.limits:
            if keys is not None and lim.key not in keys:
                continue
            over = lim.excess(values.get(lim.key))
            if not over <= 0:
                out[lim.key] = over
        return out

    def relative_miss(self, values: Dict[str, Optional[float]], keys: Optional[Collection[str]] = None) -> float:
        """The largest miss as a fraction of its limit (0 when met): how close a candidate comes."""
        missed = self.misses(values, keys)
        return max((missed[lim.key] / max(abs(lim.value), 1e-12) for lim in self.limits if lim.key in missed),
                   default=0.0)

    def __str__(self) -> str:
        return ",".join(map(str, self.limits))


def parse_budget(text: str) -> Budget:
    """``p50_ms<=5,size_mb<=4`` -> Budget; EdgeKDError with one line listing what is accepted otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise EdgeKDError(f"--budget is empty; {ACCEPTED}")
    limits, seen = [], set()
    for term in text.split(","):
        m = _TERM.match(term)
        if not m:
            raise EdgeKDError(f"--budget: cannot read {term.strip()!r}; {ACCEPTED}")
        key, op, number = m.groups()
        if key not in KEYS:
            raise EdgeKDError(f"--budget: unknown key {key!r}; {ACCEPTED}")
        if op not in KEYS[key][1]:
            raise EdgeKDError(f"--budget: {key} takes {' or '.join(KEYS[key][1])}, got {op!r}; {ACCEPTED}")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (key == "top1" and value > 1):
            raise EdgeKDError(f"--budget: {key} needs a finite number{' in 0..1' if key == 'top1' else ' of 0 or more'}"
                              f", got {number!r}; {ACCEPTED}")
        if key in seen:
            raise EdgeKDError(f"--budget: {key} is given twice; {ACCEPTED}")
        seen.add(key)
        limits.append(Limit(key, op, value))
    if not any(lim.key in DEVICE_KEYS for lim in limits):
        raise EdgeKDError(f"--budget {text!r} sets no device limit (p50_ms, p90_ms, size_mb or mem_mb); {ACCEPTED}")
    return Budget(tuple(limits))
