"""fit's search order and its shared trainings, on a real Optuna study (SQLite in tmp_path) with the training
replaced by a recorder: which candidates are trained, in which order, and what a reused trial reports."""

import pytest

from edgekd.fit import search
from edgekd.fit.budget import parse_budget
from edgekd.fit.clock import DEFAULT_EPOCHS, EPOCH_MARGIN, TrialCost, finalist_epochs, trial_cost
from edgekd.fit.final import pick_finalists


def _cand(student, precision, p50):
    return {"key": f"{student}@32/{precision}/onnxruntime", "student": student, "size": 32, "precision": precision,
            "runtime": "onnxruntime", "measured": {"p50_ms": p50}}


def test_spread_order_covers_the_range_from_both_ends():
    assert search.spread_order(list(range(7))) == [6, 0, 3, 1, 4, 2, 5]
    assert search.spread_order([1, 2]) == [2, 1] and search.spread_order([]) == []
    assert sorted(search.spread_order(list(range(10)))) == list(range(10))  # every item once


def test_precisions_of_one_student_share_one_training(tmp_path, monkeypatch):
    trained = []

    def record(cand, settings, folder, epochs, twin=None, **more):
        trained.append(cand["key"])
        top1 = 0.5 if cand["student"] == "s" else 0.7
        twin.report(top1, 1)
        return {"test_top1": top1, "history": [{"seconds": 2.0}]}, [top1], False

    monkeypatch.setattr(search, "distill_trial", record)
    feasible = [_cand("s", "int8", 1.0), _cand("s", "fp32", 2.0), _cand("t", "fp32", 3.0)]
    store = search.storage(f"sqlite:///{tmp_path}/study.db", 0)
    study = search.open_study(store, 0, create=True)
    search.enqueue_spread(study, feasible, 3)
    objective = search.objective_for(parse_budget("p50_ms<=5"), feasible, {"work": str(tmp_path), "epochs_short": 1},
                                     store)
    study.optimize(objective, n_trials=3)
    # the slowest pair first, then the other; fp32 first within a pair; its int8 export reuses the fp32 training
    assert [t.params["candidate"] for t in study.trials] == ["t@32/fp32/onnxruntime", "s@32/fp32/onnxruntime",
                                                             "s@32/int8/onnxruntime"]
    assert trained == ["t@32/fp32/onnxruntime", "s@32/fp32/onnxruntime"]
    reused = study.trials[2]
    assert reused.user_attrs["reused_from"] == 1 and reused.user_attrs["seconds"] == 0.0
    assert reused.values == [0.5, 1.0]  # the shared top-1, its own latency


def test_the_winners_bundle_copied_to_out_still_finds_its_data(tmp_path):
    """fit copies the winning finalist's bundle from OUT/work/final/NN/ to OUT/bundle: the manifest's relative data
    and source paths are rebased, so `edgekd bench OUT/bundle` reads the same images."""
    from edgekd.base.files import path_from_file, portable, rebased, spec_from_file

    data = tmp_path / "data"
    data.mkdir()
    old = tmp_path / "fit" / "work" / "final" / "00" / "bundle-00"
    old.mkdir(parents=True)
    new = tmp_path / "fit" / "bundle"
    new.mkdir()
    ckpt = old.parent / "student.pt"
    ckpt.write_text("weights")
    record = portable({"data": f"imagefolder:{data}", "training": {"source": str(ckpt), "loss": "kd"},
                       "source": "torchvision:resnet18"}, str(old))
    moved = rebased(record, str(old), str(new))
    assert spec_from_file(record["data"], str(new)) != f"imagefolder:{data}"  # unrebased: the wrong folder
    assert spec_from_file(moved["data"], str(new)) == f"imagefolder:{data}"
    assert path_from_file(moved["training"]["source"], str(new)) == str(ckpt)
    assert moved["source"] == "torchvision:resnet18" and moved["training"]["loss"] == "kd"


def test_the_finalists_epochs_fill_the_time_left():
    cost = trial_cost(seconds=30.0, epochs=3, wall=45.0)  # 10 s an epoch, 15 s of set-up and evaluation
    assert cost == TrialCost(10.0, 15.0)
    # 1,000 s left: 15 s of set-up and two exports of 2 x 20 s set aside, the rest in 10 s epochs (with the margin)
    assert finalist_epochs(None, [cost], 1000.0, exports=2, export_seconds=20.0) == (1000 - 15 - 80) // (10 * EPOCH_MARGIN)
    # two finalists train the same epochs, each paying its own
    assert finalist_epochs(None, [cost, TrialCost(5.0, 5.0)], 1000.0, 1, 20.0) == (1000 - 20 - 40) // (15 * EPOCH_MARGIN)
    assert finalist_epochs(None, [cost], 10.0, 1, 20.0) == 1  # out of time: one epoch, not none
    assert finalist_epochs(7, [cost], 1000.0, 1, 20.0) == 7  # --epochs wins
    assert finalist_epochs(None, [cost], None, 1, 20.0) == DEFAULT_EPOCHS  # no --hours
    assert trial_cost(None, 3, 10.0) is None and trial_cost(float("nan"), 3, 10.0) is None


@pytest.mark.parametrize("margin, expected", [(0.02, ["a"]), (0.05, ["a", "b"])])
def test_a_runner_up_is_a_finalist_only_when_it_is_close(margin, expected):
    by_key = {k: {"key": k, "student": k, "size": 32} for k in "abc"}
    trials = [{"number": i, "state": state, "candidate": k, "top1_short": top1, "constraints": [-1.0]}
              for i, (k, state, top1) in enumerate([("a", "COMPLETE", 0.56), ("b", "COMPLETE", 0.53),
                                                     ("c", "PRUNED", 0.60)])]
    assert [t["candidate"] for t in pick_finalists(trials, by_key, 2, margin)] == expected


@pytest.mark.parametrize("p50, timing, status, expected", [
    (0.34, "quick", "ok", True),     # just under the limit: noise could flip it
    (0.43, "quick", "ok", True),     # just over
    (0.10, "quick", "ok", False),    # far under: meets whatever the noise
    (0.60, "quick", "ok", False),    # far over
    (0.34, "full", "ok", False),     # timed fully already
    (0.34, "quick", "failed", False),
    (float("nan"), "quick", "ok", False)])
def test_a_quick_timing_is_redone_fully_only_near_a_latency_limit(p50, timing, status, expected):
    from edgekd.fit.latency import needs_full_timing

    entry = {"p50_ms": p50, "p90_ms": None, "size_mb": 0.1, "timing": timing, "status": status}
    assert needs_full_timing(entry, parse_budget("p50_ms<=0.35,size_mb<=4")) is expected
    assert needs_full_timing(entry, parse_budget("size_mb<=4")) is False  # no latency limit: nothing to redo
