"""``edgekd fit``: the most accurate student that meets a device's budget (the work is in fit/)."""

from .. import EdgeKDError


class Fit:
    """Its options: fit/options.py's FitOptions (the command line is made from its fields)."""

    name = "fit"
    help = "search students, input sizes, precisions and runtimes for the most accurate bundle within a device budget"
    description = ("Export every candidate of the search space untrained and time it on --device (a latency table "
                   "per device, reused by later fits); distil only those within --budget, in an Optuna study "
                   "(maximise top-1, minimise latency, the budget as constraints; SQLite in --out or --storage URL, "
                   "--join to add workers), every trial from one teacher cache; train the finalists fully, export, "
                   "gate and measure them again; write bundle/, report.md, trials.csv, trials.json, pareto.png, "
                   "latency.json. A budget nothing meets, an empty space or an unreachable device: exit 2.")

    def add_arguments(self, p):
        from ..core.config import add_options

        add_options(p, self.name)

    def run(self, opts):
        from ..base.outdir import check_contents, check_writable
        from ..base.progress import printable
        from ..fit.budget import parse_budget
        from ..fit.run import run_fit
        from .int8 import train_qat

        if not (opts.join or opts.resume):
            parse_budget(opts.budget or "")  # a bad budget fails before anything is written
            if not opts.out:
                raise EdgeKDError("--out DIR is required (or --resume DIR, --join DIR|URL)")
            check_writable(opts.out)
            check_contents(opts.out, opts.force)

        def say(line):
            print(printable(line), flush=True)

        summary = run_fit(opts, train_qat=train_qat, say=say)
        if opts.join:
            say(f"worker done: {summary['trials_run']} trial(s) run on {summary['joined']}")
            return
        w, p = summary["winner"], summary["teacher_passes"]
        say(f"winner {w['key']}: top-1 {w['top1']:.4f}, p50 {w['measured']['p50_ms']:.3f} ms on {opts.device}, "
            f"{w['measured']['size_mb']:.3f} MB -> {opts.resume or opts.out}/bundle")
        say(f"teacher forward passes: {p['passes']} ({p['images']} images x {p['views']} view(s))")
