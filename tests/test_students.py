"""Pretrained students (torchvision/timm specs, local weights files) and unlabelled images (--unlabeled).

No weights are downloaded here: the tests write random state dicts of the real architectures to local
files, and the download path is checked to fail fast, in one line, without internet.
"""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from edgekd import EdgeKDError
from edgekd.core.data import InputSpec, load_unlabeled
from edgekd.core.losses import make_loss
from edgekd.core.models import build_model, check_spec, parse_timm_spec, parse_torchvision_spec
from edgekd.core.pretrained import build_pretrained

GREY8 = InputSpec(1, 8, 8, [0.5], [0.5])  # the digits_folder fixture's images
RGB32 = InputSpec(3, 32, 32, [0.5] * 3, [0.5] * 3)
IMAGENET_GREY = sum([0.485, 0.456, 0.406]) / 3


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


# --- specs ---------------------------------------------------------------------------------------


def test_torchvision_specs_parse_weights_and_stem_unambiguously():
    assert parse_torchvision_spec("torchvision:resnet18") == ("resnet18", None, "")
    assert parse_torchvision_spec("torchvision:resnet18:small-stem") == ("resnet18", None, "small-stem")
    assert parse_torchvision_spec("torchvision:resnet18:DEFAULT") == ("resnet18", "DEFAULT", "")
    assert parse_torchvision_spec("torchvision:mobilenet_v3_small:IMAGENET1K_V1:imagenet-stem") == (
        "mobilenet_v3_small", "IMAGENET1K_V1", "imagenet-stem")
    for bad in ("torchvision:resnet18:small-stem:DEFAULT", "torchvision:resnet18:default",
                "torchvision:resnet18:DEFAULT:IMAGENET1K_V1", "torchvision:resnet18:tiny-stem"):
        with pytest.raises(EdgeKDError, match="NAME\\[:WEIGHTS\\]\\[:STEM\\]"):
            parse_torchvision_spec(bad)
    # The weights name is checked against torchvision's enum without downloading anything.
    check_spec("torchvision:resnet18:DEFAULT")
    with pytest.raises(EdgeKDError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        check_spec("torchvision:resnet18:IMAGENET9K")


def test_timm_specs_are_random_init_unless_pretrained_is_asked_for():
    assert parse_timm_spec("timm:resnet18") == ("resnet18", False, "")
    assert parse_timm_spec("timm:resnet18:pretrained") == ("resnet18", True, "")
    assert parse_timm_spec("timm:resnet18.a1_in1k:pretrained:small-stem") == ("resnet18.a1_in1k", True, "small-stem")
    check_spec("timm:mobilenetv3_small_050")
    with pytest.raises(EdgeKDError, match="unknown timm model 'resnet81'; did you mean"):
        check_spec("timm:resnet81")


# --- pretrained weights from local files ------------------------------------------------------------


def test_torchvision_weights_file_replaces_the_head_and_keeps_the_rest(tmp_path, caplog):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="edgekd.core.models"):
        model, record = build_pretrained("torchvision:resnet18:imagenet-stem", 10, GREY8, str(path))
    assert "replaced head fc 1000 -> 10 classes" in caplog.text
    assert record["head"] == ["fc 1000 -> 10"]
    ref, got = _params(reference), _params(model)
    # Grey inputs: the stem's RGB weights are summed (a grey pixel is R = G = B).
    assert torch.equal(got["conv1.weight"], ref["conv1.weight"].sum(1, keepdim=True))
    assert got["fc.weight"].shape == (10, 512)
    assert all(torch.equal(got[k], ref[k]) for k in got if not k.startswith(("fc.", "conv1.")))
    # The same spec without the file builds the same architecture, with other (random) weights.
    fresh = build_model("torchvision:resnet18:imagenet-stem", 10, GREY8)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_weights_file_that_does_not_fit_names_the_first_bad_key(tmp_path):
    import torchvision

    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EdgeKDError, match="key 'layer1.0.conv1.weight' is \\[64, 64, 1, 1\\] in the file"):
        build_pretrained("torchvision:resnet18", 10, RGB32, str(tmp_path / "bad.pth"))
    torch.save({"not_a_layer.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(EdgeKDError, match="has no key 'conv1.weight'"):
        build_pretrained("torchvision:resnet18", 10, RGB32, str(tmp_path / "other.pth"))
    torch.save(torchvision.models.resnet18(num_classes=1000), tmp_path / "pickled.pth")  # a whole module
    with pytest.raises(EdgeKDError, match="pickled Python objects"):
        build_pretrained("torchvision:resnet18", 10, RGB32, str(tmp_path / "pickled.pth"))
    with pytest.raises(EdgeKDError, match="names its pretrained weights and a weights file"):
        build_pretrained("torchvision:resnet18:DEFAULT", 10, RGB32, str(tmp_path / "bad.pth"))


def test_train_from_a_torchvision_weights_file_and_export_the_checkpoint(cli, digits_folder, tmp_path):
    import torchvision

    from edgekd.core.loading import load_model

    torch.manual_seed(2)
    reference = torchvision.models.resnet18(num_classes=1000)
    weights = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), weights)
    out = tmp_path / "run"
    # A learning rate of 1e-12 leaves the weights where the file put them, so the test can compare.
    cli("train", "--model", "torchvision:resnet18", "--weights", weights, "--data", digits_folder, "--epochs", 1,
        "--lr", "1e-12", "--weight-decay", 0, "--warmup-epochs", 0, "--train-subset", 60, "--workers", 0, "--no-progress",
        "--out", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrained"]["head"] == ["fc 1000 -> 10"] and m["pretrained"]["source"] == f"file {weights.name}"
    assert m["train_data"]["norm"].startswith("pretrained: ImageNet")
    assert m["train_data"]["mean"] == pytest.approx([IMAGENET_GREY])
    # The checkpoint rebuilds from its spec (no file, no download) and carries the weights.
    model, ckpt = load_model(str(out / "model.pt"))
    assert ckpt["input"]["mean"] == pytest.approx([IMAGENET_GREY])
    ref, got = _params(reference), _params(model)
    # At 8 px the ResNet's stem is a new 3x3 stride-1 conv1 (no pretrained weights) and the head is new.
    kept = [k for k in got if not k.startswith(("fc.", "conv1."))]
    assert len(kept) > 50 and all(torch.allclose(got[k], ref[k], atol=1e-6) for k in kept)
    cli("export", out / "model.pt", "--format", "onnx", "--val-size", 20, "--no-speed-check", "--out", tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["validation"]["top1_agreement"] == 1.0


def test_distill_a_timm_student_from_a_safetensors_file(cli, digits_folder, tmp_path, caplog):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = timm.create_model("mobilenetv3_small_050", num_classes=1000)
    weights = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    with caplog.at_level(logging.INFO, logger="edgekd.core.models"):
        model, record = build_pretrained("timm:mobilenetv3_small_050", 10, RGB32, str(weights))
    assert "replaced head classifier 1000 -> 10 classes" in caplog.text
    ref, got = _params(reference), _params(model)
    # The small-input stem keeps the first convolution's weights (stride 1), so all but the head match.
    assert all(torch.equal(got[k], ref[k]) for k in got if not k.startswith("classifier."))
    out = tmp_path / "distill"
    cli("distill", "--student", "timm:mobilenetv3_small_050", "--student-weights", weights, "--data", digits_folder,
        "--teacher", "compact-student", "--epochs", 1, "--train-subset", 60, "--workers", 0, "--no-progress", "--out", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["pretrained"]["head"] == ["classifier 1000 -> 10"]
    assert m["train_data"]["norm"] == "pretrained: timm mobilenetv3_small_050 pretrained config"


def test_named_weights_without_internet_fail_in_one_line(digits_folder, tmp_path):
    # The real download path, pointed at an empty cache and a proxy that refuses: it must fail fast.
    dead = "http://127.0.0.1:9"
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), https_proxy=dead, HTTPS_PROXY=dead, http_proxy=dead,
               HTTP_PROXY=dead, no_proxy="", NO_PROXY="")
    proc = subprocess.run([sys.executable, "-m", "edgekd", "train", "--model", "torchvision:resnet18:DEFAULT",
                           "--data", str(digits_folder), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("edgekd train: error:")]
    assert len(error) == 1 and "could not download torchvision weights ResNet18_Weights.IMAGENET1K_V1" in error[0]
    assert "--student-weights PATH" in error[0]
    assert not (tmp_path / "o" / "model.pt").exists()


def test_a_pretrained_spec_rebuilds_from_a_checkpoint_without_downloading(tmp_path):
    from edgekd.core.checkpoint import save_checkpoint
    from edgekd.core.loading import load_model

    model = build_model("torchvision:resnet18:DEFAULT", 10, GREY8)  # architecture only: nothing downloaded
    save_checkpoint(tmp_path / "m.pt", model, spec="torchvision:resnet18:DEFAULT", classes=[str(i) for i in range(10)],
                    input_spec=GREY8, data_spec="digits", metrics={}, config={})
    loaded, ckpt = load_model(str(tmp_path / "m.pt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model"] == "torchvision:resnet18:DEFAULT"


# --- unlabelled images ----------------------------------------------------------------------------


def _png(path, value=128, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (size, size), value).save(path)


def test_unlabeled_folder_reads_any_nesting_and_refuses_empty_folders(tmp_path):
    root = tmp_path / "unl"
    _png(root / "a" / "b" / "1.png")
    _png(root / "a" / "2.PNG")
    _png(root / "3.png")
    (root / "notes.txt").write_text("not an image")
    os.symlink(root / "a", root / "a" / "b" / "loop")  # a link back up must not loop forever
    folder = load_unlabeled(str(root))
    assert len(folder) == 3 and folder.found == 3
    assert load_unlabeled(str(root), labelled={os.path.realpath(root / "3.png")}).skipped["in_labelled_train"] == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeKDError, match="holds no image files"):
        load_unlabeled(str(tmp_path / "empty"))
    (tmp_path / "text" / "deep").mkdir(parents=True)
    (tmp_path / "text" / "deep" / "a.txt").write_text("x")
    with pytest.raises(EdgeKDError, match="holds no image files"):
        load_unlabeled(str(tmp_path / "text"))
    with pytest.raises(EdgeKDError, match="is not a folder"):
        load_unlabeled(str(tmp_path / "missing"))
    # a/b's link back up leads to a folder that holds a/b itself: refused, never walked
    with pytest.raises(EdgeKDError, match="which holds the folder itself"):
        load_unlabeled(str(root / "a" / "b"))
    _png(tmp_path / "seen" / "c" / "4.png")
    _png(tmp_path / "seen" / "5.png")
    both = {os.path.realpath(tmp_path / "seen" / "c" / "4.png"), os.path.realpath(tmp_path / "seen" / "5.png")}
    with pytest.raises(EdgeKDError, match="all 2 images are already in the labelled training set"):
        load_unlabeled(str(tmp_path / "seen"), labelled=both)


def test_distill_with_unlabeled_images_counts_labelled_unlabelled_and_skipped(cli, cli_main, digits_folder, tmp_path):
    # --unlabeled at the whole folder: the 50 labelled train images and the 80 test images are skipped, the
    # other 270 train images join as unlabelled; the teacher cache treats them as ordinary views.
    out = tmp_path / "few"
    cli("distill", "--data", digits_folder, "--train-subset", 50, "--unlabeled", digits_folder, "--epochs", 1,
        "--teacher", "compact-student", "--teacher-cache", tmp_path / "cache", "--workers", 0, "--no-progress",
        "--out", out)
    d = json.loads((out / "metrics.json").read_text())["train_data"]
    assert (d["labelled_images"], d["unlabeled_images"], d["train_images"]) == (50, 270, 320)
    assert d["unlabeled"]["skipped"] == {"in_labelled_train": 50, "in_test": 80, "unreadable": 0}
    assert d["unlabeled"]["files"] == 400 and d["unlabeled"]["compared_by_path"] is True
    # edgekd train has no teacher for them: one line, exit 2.
    proc = cli_main("train", "--data", digits_folder, "--unlabeled", digits_folder, "--out", tmp_path / "t")
    assert proc.returncode == 2 and "use edgekd distill --unlabeled DIR" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unreadable_unlabeled_images_stop_or_are_skipped(cli, cli_main, digits_folder, tmp_path):
    unl = tmp_path / "unl"
    for i in range(6):
        _png(unl / "x" / f"{i}.png", value=40 * i)
    (unl / "x" / "broken.png").write_bytes(b"not a png at all")
    args = ["distill", "--data", digits_folder, "--train-subset", 30, "--unlabeled", unl, "--epochs", 1,
            "--teacher", "compact-student", "--workers", 0, "--no-progress"]
    proc = cli_main(*args, "--out", tmp_path / "a")
    assert proc.returncode == 2 and "broken.png" in proc.stderr and "--skip-bad-images" in proc.stderr
    cli(*args, "--skip-bad-images", "--out", tmp_path / "b")
    d = json.loads((tmp_path / "b" / "metrics.json").read_text())["train_data"]
    assert d["unlabeled_images"] == 6 and d["unlabeled"]["skipped"]["unreadable"] == 1


# --- losses with unlabelled samples (label -1) ------------------------------------------------------

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, -2.0, 0.3], [0.0, 0.4, 0.1]])
T = torch.tensor([[1.5, 1.0, -0.5], [-1.0, 0.5, 2.0], [0.2, 2.0, 0.1], [1.0, 0.0, -1.0]])
Y = torch.tensor([0, 2, 1, 0])
MASKED = torch.tensor([0, -1, 1, -1])


@pytest.mark.parametrize("name", ["ce", "kd", "seed", "mse", "dkd"])
def test_hard_label_term_ignores_unlabelled_samples_and_teacher_term_keeps_them(name):
    loss = make_loss(name, label_smoothing=0.1)[0]
    loss.set_epoch(100) if hasattr(loss, "set_epoch") else None
    parts = loss(S, T, MASKED)
    labelled = MASKED >= 0
    expected_ce = torch.nn.functional.cross_entropy(S[labelled], MASKED[labelled], label_smoothing=0.1)
    assert parts["task_loss"].item() == pytest.approx(expected_ce.item(), rel=1e-6)
    if name == "dkd":  # the teacher's top class stands in for the missing label
        filled = torch.where(MASKED >= 0, MASKED, T.argmax(1))
        assert parts["kd_loss"].item() == pytest.approx(loss(S, T, filled)["kd_loss"].item(), rel=1e-6)
    elif name != "ce":  # the teacher term averages over all four samples, labelled or not
        assert parts["kd_loss"].item() == pytest.approx(loss(S, T, Y)["kd_loss"].item(), rel=1e-6)
        assert parts["kd_loss"].item() != pytest.approx(loss(S[labelled], T[labelled], Y[labelled])["kd_loss"].item())


@pytest.mark.parametrize("name", ["ce", "kd", "seed", "mse", "dkd"])
def test_a_batch_of_only_unlabelled_images_has_no_task_loss(name):
    s = S.clone().requires_grad_(True)
    parts = make_loss(name)[0](s, T, torch.full((4,), -1))
    assert parts["task_loss"].item() == 0.0
    parts["loss"].backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
