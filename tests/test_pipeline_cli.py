"""End to end through the CLI, as a user runs it: distill -> export -> bench -> predict on digits."""

import json

import numpy as np
import pytest
import torch



def test_distill_writes_checkpoints_metrics_and_config(digits_run):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert metrics["model"] == "compact-student" and metrics["epochs"] == 3 and metrics["loss"] == "kd"
    assert len(metrics["history"]) == 3 and {"loss", "task_loss", "kd_loss", "test_top1", "images_per_s"} <= set(metrics["history"][0])
    assert metrics["teacher"]["model"] == "seed-teacher" and metrics["teacher"]["source"] == "trained"
    assert 0.5 < metrics["test_top1"] <= 1 and 0.5 < metrics["teacher"]["test_top1"] <= 1
    for name in ("student.pt", "teacher.pt"):
        ckpt = torch.load(digits_run / name, weights_only=True)
        assert ckpt["classes"] == [str(i) for i in range(10)] and ckpt["data"] == "digits"
    import yaml

    config = yaml.safe_load((digits_run / "config.yaml").read_text())
    assert config["epochs"] == 3 and config["loss_params"] == {"temperature": 4.0, "alpha": 0.9}


def test_export_bundle_manifest_and_parity(onnx_bundle, digits_run):
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    assert manifest["format"] == "onnx" and manifest["precision"] == "fp32"
    assert set(manifest["files"]) == {p.name for p in onnx_bundle.iterdir()} - {"manifest.json"}
    v = manifest["validation"]
    assert v["images"] == 360 and v["max_abs_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
    assert v["top1"] == v["reference_top1"] == pytest.approx(json.loads((digits_run / "metrics.json").read_text())["test_top1"])
    assert manifest["input"]["shape"] == [-1, 1, 32, 32] and manifest["input"]["color"] == "L"
    # A dynamic batch axis: the ONNX model runs at batch 1 and 5.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_bundle / "model.onnx"))
    for n in (1, 5):
        assert sess.run(None, {"input": np.zeros((n, 1, 32, 32), np.float32)})[0].shape == (n, 10)


def test_bench_rows_report_and_table(onnx_bundle, digits_run, tmp_path, cli):
    out = tmp_path / "bench"
    proc = cli("bench", digits_run / "teacher.pt", digits_run / "student.pt", onnx_bundle, "--device", "cpu",
                   "--out", out, "--runs", 30, "--warmup", 5)
    assert "| teacher | torch | fp32 | cpu |" in proc.stdout and "| student-onnx | onnxruntime | fp32 | cpu |" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert [r["backend"] for r in rows] == ["torch", "torch", "onnxruntime"]
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
        assert r["params"] > 0 and r["size_mb"] > 0 and r["images"] == 360
    assert rows[0]["speedup_vs_teacher"] == 1.0 and rows[0]["top1_delta_vs_teacher"] == 0.0
    # The ONNX student computes what the PyTorch student computes.
    assert rows[2]["top1"] == rows[1]["top1"]
    assert rows[2]["params"] * 4 <= rows[0]["params"]
    assert result["environment"]["cores"] >= 1 and "torch" in result["environment"]["versions"]
    assert (out / "report.md").read_text().count("| student") == 2
    assert (out / "accuracy_vs_latency.png").stat().st_size > 1000


def test_predict_without_torch_matches_the_pytorch_model(onnx_bundle, digits_run, tmp_path, cli):
    from edgekd.core.loading import load_model
    from edgekd.core.data import load_data

    data = load_data("digits")
    paths = []
    for i in range(12):
        path = tmp_path / f"digit{i}.png"
        data.test.images[i].save(path)
        paths.append(str(path))
    proc = cli("predict", onnx_bundle, *paths, "--json", "--top-k", 3)
    results = json.loads(proc.stdout)
    model, _ = load_model(str(digits_run / "student.pt"))
    with torch.no_grad():
        expected = model(torch.stack([data.test[i][0] for i in range(12)])).argmax(1).tolist()
    assert [int(r["top"][0]["label"]) for r in results] == expected
    assert all(len(r["top"]) == 3 and r["top"][0]["score"] >= r["top"][1]["score"] for r in results)


def test_predict_imports_no_torch(onnx_bundle, digits_run, tmp_path):
    import subprocess
    import sys

    from edgekd.core.data import load_data

    path = tmp_path / "one.png"
    load_data("digits").test.images[0].save(path)
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['edgekd', 'predict', sys.argv[1], sys.argv[2]];"
            "from edgekd.cli import main; raise SystemExit(main())")
    proc = subprocess.run([sys.executable, "-c", code, str(onnx_bundle), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(path) + ": ")


def test_config_file_values_are_used_and_the_command_line_wins(tmp_path, digits_folder, cli):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nbatch_size: 32\nmodel: compact-student\nlr: 0.2\n")
    out = tmp_path / "t"
    cli("train", "--config", cfg, "--data", digits_folder, "--lr", 0.05, "--out", out, "--no-progress")
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 2 and saved["batch_size"] == 32 and saved["lr"] == 0.05
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "compact-student" and len(metrics["history"]) == 2
    assert metrics["data"].startswith("imagefolder:")


@pytest.mark.slow  # two full distillations compared
def test_seed_is_reproducible(tmp_path, cli):
    outs = []
    for name in ("a", "b"):
        cli("train", "--model", "compact-student", "--epochs", 1, "--seed", 7, "--out", tmp_path / name, "--no-progress")
        outs.append(json.loads((tmp_path / name / "metrics.json").read_text())["history"][0]["loss"])
    assert outs[0] == outs[1]


def test_distill_with_a_teacher_checkpoint_and_seed_loss(digits_run, tmp_path, cli):
    out = tmp_path / "s"
    cli("distill", "--teacher", digits_run / "teacher.pt", "--student", "seed-student", "--loss", "seed",
            "--epochs", 1, "--out", out, "--no-progress")
    metrics = json.loads((out / "metrics.json").read_text())
    assert not (out / "teacher.pt").exists()
    assert metrics["loss_params"] == {"temperature": 0.5, "alpha": 0.5}
    assert metrics["teacher"]["source"].endswith("teacher.pt")


# (command line, what the one-line error says); {ckpt} is the digits student, {notckpt} a text file named .pt
BAD = [
    (["distill", "--student", "compact-studnet"], "unknown model 'compact-studnet'"),
    (["distill", "--loss", "kdd"], "unknown loss 'kdd'"),
    (["distill", "--data", "/no/such/folder"], "does not exist"),
    (["train", "--data", "cifar1O"], "unknown data 'cifar1O'"),
    (["export", "{ckpt}", "--format", "onxx"], "unknown export format 'onxx'"),
    (["export", "{ckpt}", "--format", "onnx", "--precision", "int4"], "does not support precision 'int4'"),
    (["export", "{notckpt}", "--format", "onnx"], "not a usable edgekd checkpoint"),
    (["export", "/no/such.pt", "--format", "onnx"], "does not exist"),
    (["bench", "/no/such.pt", "--device", "cpu"], "does not exist"),
    (["bench", "{ckpt}", "--device", "tpu"], "unknown device 'tpu'"),
    (["train", "--epochs", "0"], "expected a positive whole number"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(args) for args, _ in BAD])
def test_bad_input_is_one_line_exit_2_no_traceback(request, tmp_path, args, message, cli_main, one_line_error):
    notckpt = tmp_path / "notes.pt"
    notckpt.write_text("not a checkpoint")
    if any("{ckpt}" in a for a in args):
        args = [a.format(ckpt=request.getfixturevalue("digits_run") / "student.pt") for a in args]
    args = [a.format(notckpt=notckpt) for a in args]
    one_line_error(cli_main(*args, "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_needs_force(tmp_path, digits_run, cli_main):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = cli_main("export", digits_run / "student.pt", "--format", "onnx", "--out", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert (out / "keep.txt").read_text() == "x"


def test_failed_parity_check_leaves_no_bundle(tmp_path, digits_run, cli_main):
    out = tmp_path / "bundle"
    proc = cli_main("export", digits_run / "student.pt", "--format", "onnx", "--atol", "1e-12", "--out", out)
    assert proc.returncode == 2 and "parity check failed" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


def test_tampered_bundle_is_refused(tmp_path, onnx_bundle, cli_main):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle, copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(img)
    proc = cli_main("predict", copy, img)
    assert proc.returncode == 2 and "does not match its sha256" in proc.stderr


def test_help_explains_every_option(cli_main):
    from edgekd.cli import build_parser

    _, sub = build_parser()
    for name, parser in sub.choices.items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"edgekd {name} {action.option_strings or action.dest} has no help"
    proc = cli_main("distill", "--help")
    assert proc.returncode == 0 and "usage: edgekd distill" in proc.stdout
