"""``edgekd fit``: the most accurate student that meets a device's budget (the work is in fit/)."""

from .. import EdgeKDError
from ..base.progress import printable
from ..fit.budget import parse_budget
from ..fit.options import FitOptions
from ..fit.report import summary_lines
from ..fit.run import run_fit
from .command import Command
from .int8 import train_qat


def say(line: str) -> None:
    """One line of the fit's progress on stdout (control characters made printable)."""
    print(printable(line), flush=True)


class Fit(Command):
    """Its options: fit/options.py's FitOptions (the command line is made from its fields)."""

    name = "fit"
    help = "search students, input sizes, precisions and runtimes for the most accurate bundle within a device budget"
    description = ("Export every candidate of the search space untrained and time it on --device (a latency table "
                   "per device, reused by later fits); distil only those within --budget, in an Optuna study "
                   "(maximise top-1, minimise latency, the budget as constraints; SQLite in --out or --storage URL, "
                   "--join to add workers), every trial from one teacher cache; train the finalists fully, export, "
                   "gate and measure them again; write bundle/, report.md, trials.csv, trials.json, pareto.png, "
                   "latency.json. A budget nothing meets, an empty space or an unreachable device: exit 2.")

    def run(self, opts: FitOptions) -> None:
        """Run the fit (the fit owns --out: edgekd.fit.run.run_fit checks, locks and marks it) and print its result."""
        if not (opts.join or opts.resume):
            parse_budget(opts.budget or "")  # a bad budget fails before anything is written
            if not opts.out:
                raise EdgeKDError("--out DIR is required (or --resume DIR, --join DIR|URL)")
        summary = run_fit(opts, train_qat=train_qat, say=say)
        for line in summary_lines(summary, opts.device, str(opts.resume or opts.out)):
            say(line)
