"""Calibration accounting: counted in images, class-stratified, seeded, hashed; bad sizes refused."""

import hashlib

import numpy as np
import pytest

from edgekd import EdgeKDError
from edgekd.export import calibration


@pytest.fixture(scope="module")
def digits():
    from edgekd.core.data import load_data

    return load_data("digits")


def _select(data, size, seed=0):
    return calibration.select(data.train, size, seed, data_spec=data.spec, split="train", class_names=data.classes)


def test_count_stratification_seed_and_hash(digits):
    indices, record = _select(digits, 300)
    assert len(indices) == len(set(indices)) == record["images"] == 300
    assert record["split"] == "train" and record["seed"] == 0 and record["available"] == len(digits.train)
    targets = np.asarray(digits.train.targets)
    share = np.bincount(targets) / len(targets) * 300
    counts = np.bincount(targets[indices], minlength=10)
    assert (np.abs(counts - share) < 1).all()  # proportional to the classes, to within one image
    assert record["per_class"] == {str(c): int(n) for c, n in enumerate(counts)}
    assert record["files"] == [f"#{i}" for i in indices]
    assert record["files_sha256"] == hashlib.sha256("\n".join(record["files"]).encode()).hexdigest()
    assert _select(digits, 300)[1]["files_sha256"] == record["files_sha256"]
    assert _select(digits, 300, seed=1)[1]["files_sha256"] != record["files_sha256"]


def test_folder_data_records_file_paths(digits_folder):
    from edgekd.core.data import load_data

    data = load_data(str(digits_folder))
    indices, record = _select(data, 50)
    assert record["images"] == 50 and all(f.startswith("digit") and f.endswith(".png") for f in record["files"])
    assert set(record["per_class"]) <= set(data.classes)


def test_empty_and_too_small_sets_are_errors(digits):
    with pytest.raises(EdgeKDError, match=f"too small: the train split of 'digits' holds {len(digits.train)} images "
                                          "but 5000 were asked for"):
        _select(digits, 5000)
    with pytest.raises(EdgeKDError, match=r"size 4 is too small: .* at least one image per class \(10 classes"):
        _select(digits, 4)

    class Empty:
        targets = []

        def __len__(self):
            return 0

    with pytest.raises(EdgeKDError, match="calibration set is empty: the train split of 'x' holds no images"):
        calibration.select(Empty(), 10, 0, data_spec="x", split="train", class_names=[])


def test_export_refuses_a_calibration_set_larger_than_the_data(digits_run, tmp_path):
    from edgekd.export.pipeline import ExportOptions, export_checkpoint

    out = tmp_path / "b"
    with pytest.raises(EdgeKDError, match="calibration set too small"):
        export_checkpoint(str(digits_run / "student.pt"), ExportOptions(
            format="onnx", precision="int8", out=str(out), calib_size=100000, progress=False))
    assert not out.exists()
