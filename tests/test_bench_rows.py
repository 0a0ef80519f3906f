"""Bench rows and the card's records are typed (bundle/rows.py, bundle/card_records.py): JSON is read into them and
written from them with the keys, order and omissions results.json, the device runner and MODEL_CARD.md always had."""

import json

import pytest

from edgekd.bench.stats import timing
from edgekd.bundle.card_records import CardBlock, CardManifest, Measurement
from edgekd.bundle.rows import (BenchResult, BenchRow, DeviceRow, Load, Profile, RecordError, VisitLog)

ROW_KEYS = ["model", "backend", "precision", "device", "arch", "params", "flops", "size_mb", "path", "batch_size",
            "images", "top1", "top5"]
TAIL = ["speedup_vs_teacher", "top1_delta_vs_teacher", "agreement_vs_teacher"]


def test_a_failed_row_keeps_the_always_present_keys_and_leaves_out_the_rest():
    row = BenchRow(model="s", backend="onnxruntime", status="onnxruntime is not installed here")
    assert list(row.to_json()) == ROW_KEYS + ["latency_ms", "throughput_ips", "status"] + TAIL + ["best"]
    assert row.to_json()["latency_ms"] is None and not row.ok and row.p50 != row.p50  # NaN: compares false


def test_a_timed_row_writes_its_figures_in_order_and_reads_back_equal():
    latency, throughput = timing([3.0, 1.0, 2.0], 4)
    row = BenchRow(model="s", backend="openvino", threads=2, first_inference_ms=5.0, runtime_precision="f32",
                   peak_rss_mb=80.0, latency_ms=latency, throughput_ips=throughput, round_p50_ms=[2.0],
                   visits=[VisitLog(p50_ms=2.0, check_ms=[1.0, 1.1], kept=True)], profile_note="not profiled: x")
    data = row.to_json()
    assert list(data) == ROW_KEYS + ["first_inference_ms", "threads", "runtime_precision", "peak_rss_mb", "latency_ms",
                                     "throughput_ips", "round_p50_ms", "status", "visits"] + TAIL + [
                                     "profile", "profile_note", "best"]
    assert data["profile"] is None and data["latency_ms"]["p50"] == 2.0 and data["latency_ms"]["runs"] == 3
    assert BenchRow.from_json(json.loads(json.dumps(data))) == row


def test_device_rows_are_what_the_runner_always_printed():
    assert DeviceRow(status="no runtime", bundle="bundle0").to_json() == {"status": "no runtime", "bundle": "bundle0"}
    ok = DeviceRow(times={"1": [1.0]}, batch_status={}, load=Load(first_inference_ms=3.0, threads=1), bundle="b")
    assert list(ok.to_json()) == ["status", "times", "batch_status", "load", "bundle"]
    assert ok.to_json()["load"] == {"first_inference_ms": 3.0, "threads": 1}


def test_results_json_is_read_into_records_and_refused_when_it_is_not_one():
    result = BenchResult.from_json({"environment": {"cpu": "x", "usable_cpus": [0], "from_a_newer_edgekd": 1},
                                    "rows": [{"model": "t", "backend": "torch"}]})
    assert result.rows[0].model == "t" and result.environment.extra == {"from_a_newer_edgekd": 1}
    assert list(result.to_json()) == ["environment", "data", "settings", "rows"]
    for bad in ([1, 2], {"rows": 3}, {"rows": [4]}, {"environment": {}}):
        with pytest.raises(RecordError):
            BenchResult.from_json(bad)
    profile = {"runtime": "openvino", "total_ms": 1.0, "runs": 2, "precision_share": {"int8": 1.0},
               "by_type": [{"op_type": "Convolution", "ms": 1.0, "calls": 2, "precision": {"int8": 1.0}, "share": 1.0}],
               "by_layer": [{"name": "conv", "op_type": "Convolution", "precision": "int8", "ms": 1.0, "share": 1.0}]}
    assert Profile.from_json(profile).to_json() == profile  # no exec_type: none written


def test_the_cards_block_and_manifest_are_records_with_defaults_for_what_was_not_recorded():
    block = CardBlock.from_json({"card": 1, "training": {"command": "train", "teacher": None, "data": None,
                                                         "recipe": {"epochs": 2}},
                                 "measurements": [{"device": "cpu", "runtime": "onnxruntime", "status": "ok"}],
                                 "deployments": [], "export_command": "edgekd export m.pt", "fit": {"budget": "x"}})
    assert block.training.teacher is None and block.training.recipe.epochs == 2 and block.fit == {"budget": "x"}
    assert [m.device for m in block.ok_rows] == ["cpu"] and isinstance(block.measurements[0], Measurement)
    assert list(block.to_json()) == ["card", "training", "measurements", "deployments", "export_command", "fit"]
    assert block.to_json()["training"]["recipe"] == {"epochs": 2}
    manifest = CardManifest.from_json({"format": "onnx", "precision": "int8", "model_file": "model.onnx",
                                       "files": {}, "classes": ["a"], "calibration": None, "ladder": None})
    assert manifest.calibration.images is None and manifest.ladder == [] and manifest.validation.split == "test"
