import pytest
import torch

from edgekd import EdgeKDError
from edgekd.core.data import InputSpec, load_data, take_images
from edgekd.core.models import build_model, count_flops, count_params


def test_digits_spec_is_real_split_32x32_grey():
    data = load_data("digits")
    assert data.classes == [str(i) for i in range(10)]
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 360
    x, y = data.test[0]
    assert x.shape == (1, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0
    assert data.input.color == "L" and data.input.mean == [0.5]
    # The held-out split does not depend on the training seed, and does not overlap train.
    assert load_data("digits").test.targets == data.test.targets


def test_imagefolder_spec_reads_train_and_test(digits_folder):
    for spec in (str(digits_folder), f"imagefolder:{digits_folder}"):
        data = load_data(spec)
        assert data.classes == [f"digit{i}" for i in range(10)]
        assert len(data.train) == 320 and len(data.test) == 80
        assert data.input.channels == 1 and (data.input.height, data.input.width) == (8, 8)
    images, labels = take_images(data.test, 20)
    assert images.shape == (20, 1, 8, 8) and len(set(labels.tolist())) > 5  # a strided sample spans classes


def test_imagefolder_with_val_split(tmp_path, digits_folder):
    import shutil

    shutil.copytree(digits_folder / "train", tmp_path / "train")
    shutil.copytree(digits_folder / "test", tmp_path / "val")
    assert len(load_data(str(tmp_path)).test) == 80


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: (p / "flat").mkdir() or str(p / "flat"), "needs train/ and test/"),
    (lambda p: "digitz", "unknown data 'digitz'"),
])
def test_bad_data_specs(tmp_path, make, message):
    with pytest.raises(EdgeKDError, match=message):
        load_data(make(tmp_path))


def test_class_folders_must_agree(tmp_path, digits_folder):
    import shutil

    shutil.copytree(digits_folder, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "test" / "digit3")
    with pytest.raises(EdgeKDError, match="only in train: \\['digit3'\\]"):
        load_data(str(tmp_path / "d"))


SPEC = InputSpec(1, 32, 32, [0.5], [0.5])


@pytest.mark.parametrize("spec", ["seed-teacher", "seed-student", "compact-student", "torchvision:resnet18",
                                  "torchvision:mobilenet_v3_small"])
def test_model_specs_build_for_the_datas_channels_and_classes(spec):
    model = build_model(spec, 7, SPEC)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


def test_seed_models_follow_the_article():
    t = build_model("seed-teacher", 10, InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3))
    assert [m.in_features for m in (t.fc1, t.fc2, t.fc3)] == [128 * 8 * 8, 1024, 512]
    s = build_model("seed-student", 10, InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3))
    assert [s.fc1.in_features, s.fc1.out_features, s.fc2.out_features] == [8192, 512, 10]


def test_compact_student_is_at_most_a_quarter_of_the_teacher():
    for spec in (SPEC, InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)):
        t, s = build_model("seed-teacher", 10, spec), build_model("compact-student", 10, spec)
        assert count_params(s) * 4 <= count_params(t)
        assert count_flops(s, spec) * 4 <= count_flops(t, spec)


def test_unknown_model_names_suggest_the_closest():
    with pytest.raises(EdgeKDError, match="did you mean 'seed-teacher'"):
        build_model("seed-teachr", 10, SPEC)
    with pytest.raises(EdgeKDError, match="did you mean 'torchvision:resnet18'"):
        build_model("torchvision:resnet81", 10, SPEC)
