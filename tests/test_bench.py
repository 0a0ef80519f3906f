"""Bench building blocks on known inputs: statistics, the interleaved order, best/Pareto, --compare text."""

import numpy as np
import pytest
from tqdm import tqdm

from edgekd import EdgeKDError
from edgekd.bench import measure, plan, report, results
from edgekd.bench.plan import Job, Model, Visit
from edgekd.bundle.rows import Accuracy, BenchResult, BenchRow, BenchSettings
from edgekd.bench.stats import percentile, schedule, split_runs, summarize


def test_statistics_on_known_timings():
    s = summarize(list(range(100, 0, -1)), batch_size=1)  # 1..100 ms, given unsorted
    lat = s["latency_ms"]
    assert lat["p50"] == pytest.approx(50.5) and lat["p90"] == pytest.approx(90.1) and lat["p99"] == pytest.approx(99.01)
    assert lat["mean"] == pytest.approx(50.5) and lat["std"] == pytest.approx(29.011491975882016)  # sample std
    assert (lat["min"], lat["max"], lat["runs"]) == (1, 100, 100)
    assert s["throughput_ips"] == pytest.approx(1000 / 50.5)
    rng = np.random.default_rng(0)
    t = rng.lognormal(0, 0.5, 999)
    for q in (50, 90, 99):
        assert summarize(t, 8)["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(t, q))
    assert summarize(t, 8)["throughput_ips"] == pytest.approx(8000 / t.mean())


def test_statistics_edge_cases():
    one = summarize([2.0], 32)
    assert one["latency_ms"]["p99"] == 2.0 and one["latency_ms"]["std"] == 0.0 and one["throughput_ips"] == 16000
    assert percentile([], 50) != percentile([], 50)  # NaN for nothing measured
    with pytest.raises(ValueError):
        summarize([], 1)


def test_interleaved_order_visits_every_model_each_round_with_rotating_start():
    order = schedule(3, [1, 8], rounds=2)
    assert order == [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 8, 0), (0, 8, 1), (0, 8, 2),
                     (1, 1, 1), (1, 1, 2), (1, 1, 0), (1, 8, 1), (1, 8, 2), (1, 8, 0)]
    assert split_runs(10, 3) == [4, 3, 3] and sum(split_runs(200, 7)) == 200


class FakeWorker:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def request(self, op, **fields):
        self.calls.append((self.name, fields["batch_size"], fields["runs"], fields["warmup"]))
        if self.name == "broken" and fields["batch_size"] == 8:
            raise EdgeKDError("out of memory")
        return {"times_ms": [1.0 + len(self.calls)] * fields["runs"]}


def test_timed_rounds_follow_the_schedule_and_a_failure_marks_only_its_batch(monkeypatch):
    monkeypatch.setattr(measure, "SETTLE_S", 0)
    calls = []
    jobs = [Job(model=m, backend="x", device="cpu") for m in ("teacher", "student", "broken")]
    live = [(j, FakeWorker(j.model, calls)) for j in jobs]
    settings = BenchSettings.from_json({"rounds": 2, "batch_sizes": [1, 8], "runs": 9, "warmup": 10, "max_time_s": 5.0})
    measure._timed_rounds(live, settings, tqdm(disable=True))
    visited = [(c[0], c[1]) for c in calls]
    names = ["teacher", "student", "broken"]
    expected = [(names[k], b) for _, b, k in schedule(3, [1, 8], 2) if not (names[k] == "broken" and b == 8 and _ > 0)]
    assert visited == expected  # a batch size that failed is not visited again
    assert [c[2] for c in calls[:3]] == [5, 5, 5] and calls[-1][2] == 4  # 9 runs over 2 rounds
    assert calls[0][3] == 10 and calls[-1][3] == 5  # full warm-up first, a short re-warm later
    assert len(jobs[0].times[1]) == 9 and len(jobs[0].round_p50[1]) == 2
    assert jobs[2].batch_status == {8: "failed at batch 8: out of memory"}


def test_a_visit_counts_only_when_its_median_and_checks_are_near_the_fastest():
    visits = [Visit([], **v) for v in ({"p50_ms": 1.0, "check_ms": [1.0, 1.05]}, {"p50_ms": 1.0, "check_ms": [1.0, 1.3]},
              {"p50_ms": 1.1, "check_ms": [1.12, 1.1]}, {"p50_ms": 1.2, "check_ms": [1.0, 1.0]},
              {"p50_ms": 1.0, "check_ms": None})]
    # check floor 1.0 (visit 4), p50 floor 1.0: visit 2's check (1.3) and visit 4's median (1.2) are slow.
    assert measure.kept_visits(visits, 0.15) == [True, False, True, False, True]
    assert measure.kept_visits(visits, 0.0) == [True] * 5  # 0 keeps every visit
    assert measure.kept_visits([Visit([], p50_ms=2.0, check_ms=[2.0, 2.0])], 0.15) == [True]
    # The fastest median had a slow check, the fastest check a slow median: the least slow visit still counts.
    split = [Visit([], p50_ms=1.0, check_ms=[1.0, 1.6]), Visit([], p50_ms=1.5, check_ms=[1.0, 1.0])]
    assert measure.kept_visits(split, 0.15) == [False, True]  # slowness 1.6 against 1.5


class SpellWorker:
    """A worker whose machine runs slow (3x) on the visits listed in ``slow``; times carry the visit number (/1000)."""

    def __init__(self, name, slow, log):
        self.name, self.slow, self.log, self.visits = name, slow, log, 0

    def request(self, op, **fields):
        self.visits += 1
        self.log.append((self.name, fields["batch_size"]))
        factor = 3.0 if self.visits in self.slow else 1.0
        assert fields["check_s"] == 0.05
        return {"times_ms": [factor + self.visits / 1000] * fields["runs"], "check_ms": [factor, factor]}


def test_a_visit_in_a_slow_spell_is_measured_again_and_every_visit_stays_on_record(monkeypatch):
    monkeypatch.setattr(measure, "SETTLE_S", 0)
    log = []
    jobs = [Job(model=m, backend="x", device="cpu") for m in ("teacher", "student", "always-slow")]
    workers = [SpellWorker("teacher", set(), log), SpellWorker("student", {2}, log),
               SpellWorker("always-slow", set(range(2, 99)), log)]
    settings = BenchSettings.from_json({"rounds": 3, "batch_sizes": [1], "runs": 6, "warmup": 3, "max_time_s": 5.0,
                                        "remeasure_slow": 0.15, "check_s": 0.05, "max_extra_rounds": 3})
    measure._timed_rounds(list(zip(jobs, workers)), settings, tqdm(disable=True))
    teacher, student, slow = jobs
    assert log[:9] == [(m, 1) for m in ("teacher", "student", "always-slow", "student", "always-slow", "teacher",
                                        "always-slow", "teacher", "student")]  # the planned, interleaved rounds
    assert [v.kept for v in teacher.visit_log[1]] == [True] * 3  # never slow: no extra visit
    assert [v.kept for v in student.visit_log[1]] == [True, False, True, True]  # visit 2 done again
    assert student.times[1] == [1.001] * 2 + [1.003] * 2 + [1.004] * 2  # the slow visit's timings left out
    assert student.round_p50[1] == [1.001, 1.003, 1.004]
    # A row that never gets back to its fast state stops after --rounds extra visits, keeping what it has.
    assert len(slow.visit_log[1]) == 6 and [v.kept for v in slow.visit_log[1]] == [True] + [False] * 5
    assert log.count(("teacher", 1)) == 3 and log.count(("student", 1)) == 4
    for j in jobs:
        j.accuracy = Accuracy(top1=0.5)
    rows = results.build_rows(jobs, [1])
    assert [len(r.visits) for r in rows] == [3, 4, 6] and rows[1].latency_ms.runs == 6


def test_the_worker_checks_the_machine_before_and_after_its_timed_calls():
    import time

    import numpy as np

    from edgekd.bench.worker import Worker

    worker = Worker()
    worker.images = np.zeros((40, 1, 4, 4), dtype=np.float32)
    worker.run = lambda x: time.sleep(0.001)
    answer = worker.time({"batch_size": 4, "runs": 5, "warmup": 0, "check_s": 0.01})
    assert len(answer["times_ms"]) == 5  # the checks' calls are not timed calls
    assert len(answer["check_ms"]) == 2 and all(0.9 <= c < 50 for c in answer["check_ms"])
    assert "check_ms" not in worker.time({"batch_size": 4, "runs": 5, "warmup": 0})


def test_pareto_front_keeps_only_points_nothing_beats():
    pts = [(1.0, 80, "a"), (2.0, 85, "b"), (1.5, 79, "c"), (3.0, 84, "d"), (4.0, 90, "e"), (1.0, 70, "f")]
    assert [p[2] for p in report.pareto_front(pts)] == ["a", "b", "e"]


def _row(model, backend, b, p50, top1, status="ok"):
    return BenchRow.from_json({"model": model, "backend": backend, "precision": "fp32", "device": "cpu", "batch_size": b,
                               "top1": top1, "status": status, "latency_ms": {"p50": p50} if status == "ok" else None})


def test_best_is_the_fastest_row_within_the_allowed_top1_drop():
    rows = [_row("teacher", "torch", 1, 10.0, 0.90), _row("s", "torch", 1, 3.0, 0.895),
            _row("s", "onnxruntime", 1, 1.0, 0.87), _row("s", "openvino", 1, 2.0, 0.89)]
    results.mark_best(rows, max_drop=0.01)
    assert [r.best for r in rows] == [False, False, False, True]
    results.mark_best(rows, max_drop=0.05)
    assert [r.best for r in rows] == [False, False, True, False]


def _result(rows, cpu="AMD EPYC"):
    return BenchResult.from_json({"environment": {"cpu": cpu, "started_utc": "2026-01-01T00:00:00Z"},
                                  "rows": [r.to_json() for r in rows]})


def test_compare_names_what_got_faster_slower_more_and_less_accurate():
    old = _result([_row("teacher", "torch", 1, 10.0, 0.90), _row("s", "onnxruntime", 1, 2.0, 0.85),
                   _row("s", "openvino", 1, 2.0, 0.85), _row("gone", "torch", 1, 1.0, 0.5)])
    new = _result([_row("teacher", "torch", 1, 10.5, 0.90), _row("s", "onnxruntime", 1, 1.0, 0.86),
                   _row("s", "openvino", 1, 3.0, 0.84), _row("added", "torch", 1, 1.0, 0.5)], cpu="Other CPU")
    text = report.compare_results(old, new, "old/results.json", tolerance=0.10)
    lines = text.splitlines()
    assert lines[0].startswith("compared with old/results.json")
    assert "different CPU" in lines[1]
    block = text.split("slower")[0]
    assert "s onnxruntime fp32 cpu batch 1: p50 2.000 -> 1.000 ms (2.00x faster)" in block
    assert "s openvino fp32 cpu batch 1: p50 2.000 -> 3.000 ms (1.50x slower)" in text.split("more accurate")[0]
    assert "s onnxruntime fp32 cpu: top-1 0.8500 -> 0.8600 (+1.00 pts)" in text.split("less accurate")[0].split("more accurate")[1]
    assert "s openvino fp32 cpu: top-1 0.8500 -> 0.8400 (-1.00 pts)" in text.split("less accurate")[1]
    assert "within ±10%: 1 row(s)" in text  # the teacher moved 5%
    assert "only in this run: added torch fp32 cpu batch 1" in text and "only in the earlier run: gone torch" in text


def test_compare_refuses_a_file_that_is_not_results(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("[1, 2]")
    with pytest.raises(EdgeKDError, match="not an edgekd results.json"):
        report.load_results(str(bad))
    with pytest.raises(EdgeKDError, match="does not exist"):
        report.load_results(str(tmp_path / "none.json"))


@pytest.mark.parametrize("text, ok", [("cpu", True), ("cuda:1", True), ("openvino:GPU", True), ("openvino:GPU.1", True),
                                      ("tpu", False), ("openvino:", False), ("cuda:x", False)])
def test_device_names(text, ok):
    if ok:
        assert plan.check_device(text) == text
    else:
        with pytest.raises(EdgeKDError, match="unknown device"):
            plan.check_device(text)


def test_cpu_lists():
    import os

    first = min(os.sched_getaffinity(0))
    assert plan.parse_cpus(str(first)) == [first]
    with pytest.raises(EdgeKDError, match="cannot use"):
        plan.parse_cpus("4096")
    with pytest.raises(EdgeKDError, match="not a CPU list"):
        plan.parse_cpus("a-b")


def test_plan_runs_each_model_in_the_backends_that_can_read_it():
    ckpt, onnx, ir = (Model(model=n, kind=k) for n, k in (("t", "checkpoint"), ("s-onnx", "onnx"), ("s-ov", "openvino")))
    native = plan.plan_jobs([ckpt, onnx, ir], None, ["cpu"])
    assert [(j.model, j.backend, j.status) for j in native] == [
        ("t", "torch", None), ("s-onnx", "onnxruntime", None), ("s-ov", "openvino", None)]
    every = plan.plan_jobs([ckpt, onnx, ir], ["torch", "onnxruntime", "openvino"], ["cpu"])
    assert [(j.model, j.backend) for j in every] == [
        ("t", "torch"), ("t", "onnxruntime"), ("t", "openvino"), ("s-onnx", "onnxruntime"), ("s-onnx", "openvino"),
        ("s-ov", "openvino")]
    none = plan.plan_jobs([onnx], ["torch"], ["cpu", "cuda"])
    assert [j.status for j in none] == ["torch cannot run an onnx bundle (it runs in onnxruntime, openvino)"] * 2
    assert plan.plan_jobs([ckpt, ckpt], None, ["cpu"])[1].model == "t-2"  # two models of one name stay apart


def test_a_fast_model_gets_more_calls_until_the_minimum_time_is_covered():
    import time

    import numpy as np

    from edgekd.bench.worker import Worker

    worker = Worker()
    worker.images = np.zeros((40, 1, 4, 4), dtype=np.float32)
    worker.run = lambda x: time.sleep(0.001)  # about 1 ms a call
    few = worker.time({"batch_size": 4, "runs": 5, "warmup": 0})["times_ms"]
    assert len(few) == 5  # no minimum: exactly the runs asked for
    more = worker.time({"batch_size": 4, "runs": 5, "warmup": 0, "min_s": 0.05})["times_ms"]
    assert len(more) > 5 and sum(more) >= 50  # kept calling until 50 ms of timed calls
    capped = worker.time({"batch_size": 4, "runs": 5, "warmup": 0, "min_s": 10.0, "max_s": 0.02})["times_ms"]
    assert sum(capped) < 200  # the maximum wins over the minimum
