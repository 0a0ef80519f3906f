"""``edgekd fit``: the most accurate student that meets a device's budget.

Every (architecture, input size, precision, runtime) of the search space is exported untrained and timed on
the device first (fit/latency.py, a per-device table reused by later fits); candidates over the budget are
never trained. The rest are searched by an Optuna multi-objective study (maximise top-1, minimise latency,
the budget as constraints; fit/search.py), each trial distilled from one shared teacher cache, short
schedules pruned by successive halving; the finalists get the full schedule, are exported (INT8 through
export's ladder) and measured again on the device (fit/run.py). fit/report.py writes what it hands back.
"""
