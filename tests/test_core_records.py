"""The core's records read and write the dicts of their files unchanged (metrics.json, the training state, the
teacher's class record, the runner's input spec)."""

import pytest

from edgekd.core.data import InputSpec
from edgekd.core.metrics import EpochRecord, RunMetrics, RunRecords
from edgekd.core.teacher_cache import CacheMeta
from edgekd.core.teachers import ClassMatch
from edgekd.core.train_loop import TrainState


def test_an_epoch_record_writes_its_loss_parts_beside_its_figures_and_reads_back():
    record = EpochRecord(3, {"loss": 1.5, "task_loss": 1.0, "kd_loss": 0.5}, 0.5, 0.4, 0.01, 900.0, 2.0,
                         teacher_train_top1=0.9, teacher_seconds=0.0, teacher_share=None)
    d = record.to_json()
    assert list(d) == ["epoch", "loss", "task_loss", "kd_loss", "train_top1", "test_top1", "lr", "images_per_s",
                       "seconds", "teacher_train_top1", "teacher_seconds", "teacher_share"]
    assert d["teacher_share"] is None and EpochRecord.from_json(d) == record
    plain = EpochRecord(1, {"loss": 2.0}, 0.1, 0.2, 0.1, 10.0, 1.0)
    assert "teacher_share" not in plain.to_json() and EpochRecord.from_json(plain.to_json()) == plain


def test_run_metrics_keep_the_keys_and_order_of_metrics_json():
    history = [EpochRecord(1, {"loss": 2.0}, 0.1, 0.3, 0.1, 10.0, 1.0), EpochRecord(2, {"loss": 1.0}, 0.2, 0.2, 0.1,
                                                                                    10.0, 1.0)]
    m = RunMetrics.of("compact-student", 2, history, 10, 20, "digits")
    assert (m.test_top1, m.best_top1) == (0.2, 0.3)
    assert list(m.to_json()) == ["model", "epochs", "test_top1", "best_top1", "history", "params", "flops", "data"]
    m.run = RunRecords(None, None, None, {"spec": "digits"}, {"threads": 1}, {"world_size": 1})
    assert list(m.to_json())[-2:] == ["distributed", "cpu"]  # train
    m.loss, m.loss_params, m.teacher = "kd", {"temperature": 4.0}, {"kind": "checkpoint"}
    assert list(m.to_json())[8:] == ["loss", "loss_params", "teacher", "pretrained", "image_store", "student_dtype",
                                     "train_data", "teacher_cache", "teacher_memo", "cpu", "distributed"]


def test_a_training_state_names_the_first_field_it_lacks():
    state = TrainState(1, {}, {}, {}, {}, [], {})
    assert "scaler" not in state.to_dict() and TrainState.from_dict(state.to_dict()) == state
    with pytest.raises(KeyError, match="optimizer"):
        TrainState.from_dict({k: v for k, v in state.to_dict().items() if k != "optimizer"})
    with pytest.raises(TypeError):
        TrainState.from_dict([1, 2])


def test_small_records_of_the_core_round_trip():
    spec = InputSpec(3, 32, 24, [0.5] * 3, [0.25] * 3, 0.875)
    assert InputSpec.from_manifest(spec.manifest()) == spec and InputSpec.from_dict(spec.to_dict()) == spec
    assert list(ClassMatch("by name", 3, names_from="x", index=[2, 1, 0], teacher_names=list("cba")).to_json()) == [
        "matched", "names_from", "teacher_outputs", "index", "teacher_names"]
    assert ClassMatch("by position", 3).to_json() == {"matched": "by position", "teacher_outputs": 3}
    assert CacheMeta.from_json([1]) is None and CacheMeta.from_json({"key": 1}) is None
