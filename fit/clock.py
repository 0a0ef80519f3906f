"""The fit's time (--hours): when the trials stop starting, and how many epochs the finalists' schedule gets from
what is left. A fit bounded by --hours spends up to --search-share of it on the latency table and the trials; the
finalists' epochs fill the rest, priced by their own trials (seconds per epoch measured on this machine)."""

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_EPOCHS = 15         # the finalists' schedule of a fit without --hours or --epochs
EXPORT_SECONDS = 30.0       # one trained export, gated and measured, when the latency phase timed none here
TRAINED_EXPORT_FACTOR = 2.0  # a trained export also runs the parity gate and the test split: dearer than untrained
# the trials' price of an epoch, raised so that a fit bounded by --hours ends by then rather than after: in the
# CIFAR-10 fits of docs/records/fit.md the finalist ran its epochs 10% slower than its trial (the second run, in a
# process the exporters had slowed) and 3% faster (the third, with the exports in a child process)
EPOCH_MARGIN = 1.05


@dataclass
class Clock:
    """The fit's start, its --hours and --search-share."""

    hours: Optional[float]
    search_share: float
    start: float = field(default_factory=time.time)

    def search_left(self) -> Optional[float]:
        """Seconds in which trials may still start (None: no limit)."""
        if not self.hours:
            return None
        return self.start + self.hours * 3600 * self.search_share - time.time()

    def left(self) -> Optional[float]:
        """Seconds left of the whole fit (None: no limit)."""
        if not self.hours:
            return None
        return self.start + self.hours * 3600 - time.time()


@dataclass
class TrialCost:
    """What one trial's training cost: seconds per epoch of the training loop, and the rest of its wall time
    (model and data set-up, the test split after each epoch), the teacher cache's build left out."""

    epoch_seconds: float
    other_seconds: float


def trial_cost(seconds: Optional[float], epochs: int, wall: Optional[float]) -> Optional[TrialCost]:
    """A trial's cost from its loop seconds, epochs trained and wall time; None when it was not timed."""
    if not seconds or epochs < 1 or not math.isfinite(seconds):
        return None
    other = max((wall or seconds) - seconds, 0.0)
    return TrialCost(seconds / epochs, other)


def finalist_epochs(asked: Optional[int], costs: List[Optional[TrialCost]], left: Optional[float], exports: int,
                    export_seconds: Optional[float]) -> int:
    """The finalists' epochs: --epochs when given; without --hours the default; else as many as fill the time
    left once every finalist's set-up and every export are set aside (each finalist trains the same epochs; at
    least one)."""
    if asked:
        return asked
    if left is None:
        return DEFAULT_EPOCHS
    known = [c for c in costs if c is not None]
    if not known:
        return DEFAULT_EPOCHS
    # never below EXPORT_SECONDS: the quick screen's untrained exports are cheaper than a trained one measured fully
    per_export = max((export_seconds or EXPORT_SECONDS) * TRAINED_EXPORT_FACTOR, EXPORT_SECONDS)
    reserve = sum(c.other_seconds for c in known) + exports * per_export
    per_epoch = sum(c.epoch_seconds for c in known) * EPOCH_MARGIN
    return max(1, int((left - reserve) // per_epoch))
