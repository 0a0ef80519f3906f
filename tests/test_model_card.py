"""MODEL_CARD.md in every bundle: written by export, updated by bench, read by huggingface_hub offline, covered by
the manifest's checksums; a bundle from before cards still verifies and runs."""

import json
import shutil

import pytest

from edgekd.bundle.card import CARD_FILE, record_bench, update_card
from edgekd.bundle.card_text import ms, pct
from edgekd.bundle.manifest import read_manifest, sha256_file, write_manifest
from edgekd.bundle.rows import BenchResult


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli):
    """compact-student, 1 epoch against a 1-epoch teacher on digits, exported to ONNX fp32 (CLI subprocesses)."""
    out = tmp_path_factory.mktemp("card")
    cli("distill", "--epochs", 1, "--teacher-epochs", 1, "--out", out / "run", "--no-progress")
    cli("export", out / "run" / "student.pt", "--format", "onnx", "--val-size", 120, "--out", out / "bundle",
        "--no-progress")
    return out


@pytest.fixture
def image(tmp_path):
    from edgekd.core.data import load_data

    path = tmp_path / "digit.png"
    load_data("digits").test.images[0].save(path)
    return path


def load_card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(str(folder / CARD_FILE))  # a local path: parsed offline (validate() would call the Hub)


def test_export_writes_a_card_whose_numbers_are_the_manifests_and_the_checkpoints(run):
    bundle = run / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    metrics = json.loads((run / "run" / "metrics.json").read_text())
    assert manifest["files"][CARD_FILE] == sha256_file(bundle / CARD_FILE)
    assert manifest["size_bytes"] == sum((bundle / n).stat().st_size for n in manifest["files"])
    card = load_card(bundle)
    assert card.data.library_name == "onnx" and "edgekd" in card.data.tags
    [export] = card.data.eval_results
    assert (export.task_type, export.metric_type, export.metric_config) == ("image-classification", "accuracy", "export")
    assert export.metric_value == manifest["validation"]["top1"] and export.metric_args == {"images": 120}
    assert export.dataset_type == "digits" and export.dataset_split == "test"
    training = card.data.edgekd["training"]
    teacher = metrics["teacher"]
    assert training["teacher"]["sha256"] == teacher["sha256"] and training["teacher"]["test_top1"] == teacher["test_top1"]
    assert training["data"]["train_images"] == metrics["train_data"]["train_images"]
    assert training["command_line"] == "edgekd distill --teacher-epochs 1 --epochs 1"
    text = card.text
    assert f"| {pct(teacher['test_top1'])} |" in text and f"`{teacher['sha256']}`" in text
    assert f"top-1 {pct(manifest['validation']['top1'])}" in text
    assert "Not benchmarked yet" in text and "Runtime" not in text.split("## Not tested")[1].split("##")[0]
    assert "edgekd export student.pt --format onnx --val-size 120 --out bundle" in text
    for name in ("## Teacher", "## Data", "## Recipe", "## Export check", "## Measured", "## Not tested", "## Reproduce"):
        assert name in text


@pytest.mark.slow  # a whole CLI pipeline in subprocesses: make test-slow
def test_bench_adds_its_rows_and_the_bundle_still_verifies(run, tmp_path, image, cli):
    bundle = tmp_path / "bundle"
    shutil.copytree(run / "bundle", bundle)
    cli("bench", bundle, "--quick", "--limit", 100, "--batch-sizes", "1,2", "--runs", 6, "--rounds", 1,
        "--out", tmp_path / "bench", "--no-progress")
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    card = load_card(bundle)
    measured = card.data.edgekd["measurements"]
    assert len(measured) == len(rows) == 2
    for row, m in zip(rows, measured):
        assert (m["p50_ms"], m["p90_ms"], m["top1"], m["batch_size"], m["peak_rss_mb"]) == (
            row["latency_ms"]["p50"], row["latency_ms"]["p90"], row["top1"], row["batch_size"], row["peak_rss_mb"])
        assert f"| {row['batch_size']} | {ms(row['latency_ms']['p50'])} | {ms(row['latency_ms']['p90'])} |" in card.text
    bench_results = [r for r in card.data.eval_results if r.metric_config != "export"]
    assert [r.metric_value for r in bench_results] == [rows[0]["top1"]]  # top-1 does not depend on the batch size
    assert "onnxruntime" in bench_results[0].metric_name and bench_results[0].metric_args == {"images": 100}
    assert "Runtime openvino (it can load this bundle)" in card.text
    manifest = read_manifest(str(bundle))
    assert manifest.files[CARD_FILE] == sha256_file(bundle / CARD_FILE)
    cli("predict", bundle, image)  # verification (every sha256, nothing unlisted) still passes


def test_a_card_edited_by_hand_fails_verification_and_is_never_reblessed(run, tmp_path, image, cli):
    bundle = tmp_path / "bundle"
    shutil.copytree(run / "bundle", bundle)
    with open(bundle / CARD_FILE, "a") as f:
        f.write("\nTop-1: 99.9 % on every device.\n")
    proc = cli("predict", bundle, image, check=False)
    assert proc.returncode == 2 and CARD_FILE in proc.stderr and "does not match its sha256" in proc.stderr
    edited = (bundle / CARD_FILE).read_text()
    assert not update_card(str(bundle), lambda block: block)
    assert (bundle / CARD_FILE).read_text() == edited and not sha256_file(bundle / CARD_FILE) == json.loads(
        (bundle / "manifest.json").read_text())["files"][CARD_FILE]


def test_a_bundle_from_before_cards_still_runs_and_is_left_alone(run, tmp_path, image, cli):
    bundle = tmp_path / "old"
    shutil.copytree(run / "bundle", bundle)
    (bundle / CARD_FILE).unlink()
    manifest = read_manifest(str(bundle)).to_dict()
    del manifest["files"][CARD_FILE]
    write_manifest(str(bundle), manifest)
    before = (bundle / "manifest.json").read_text()
    assert "label" in cli("predict", bundle, image, "--json").stdout
    rows = [{"path": str(bundle), "device": "cpu", "backend": "onnxruntime", "precision": "fp32", "batch_size": 1,
             "latency_ms": {"p50": 1.0, "p90": 2.0}, "top1": 0.5, "status": "ok"}]
    assert record_bench(BenchResult.from_json({"environment": {}, "rows": rows})) == []
    assert not (bundle / CARD_FILE).exists() and (bundle / "manifest.json").read_text() == before


def test_deploy_notes_where_it_was_installed_in_both_copies(run, tmp_path, sshd, device_python, cli):
    """The loopback SSH device (tests/conftest.py's sshd): the card says where the bundle was installed and checked,
    and the copy on the device is the same, updated bundle (it verifies there)."""
    bundle, device = tmp_path / "bundle", tmp_path / "device"
    shutil.copytree(run / "bundle", bundle)
    device.mkdir()
    cli("deploy", bundle, f"ssh://edgedevice:{device}", "--ssh-config", sshd, "--python", device_python)
    installed = device / "bundle"
    assert (installed / CARD_FILE).read_text() == (bundle / CARD_FILE).read_text()
    assert (installed / "manifest.json").read_text() == (bundle / "manifest.json").read_text()
    [entry] = load_card(bundle).data.edgekd["deployments"]
    assert entry["device"] == "ssh://edgedevice" and entry["path"] == str(installed)
    assert entry["checked"].startswith("sha256, load, one batch") and "onnxruntime" in entry["versions"]
    text = load_card(installed).text
    assert "## Installed" in text and "ssh://edgedevice: installed and checked, not timed there." in text
    read_manifest(str(installed))  # and it verifies, here as there
    from edgekd.bundle.runtime import verify_bundle

    verify_bundle(str(installed))


def test_fit_records_how_the_model_was_chosen(run, tmp_path):
    from edgekd.bundle.card import record_fit
    from edgekd.bundle.runtime import verify_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(run / "bundle", bundle)
    assert record_fit(str(bundle), {"budget": "p50_ms<=5", "device": "cpu", "trials": 12})
    card = load_card(bundle)
    assert card.data.edgekd["fit"] == {"budget": "p50_ms<=5", "device": "cpu", "trials": 12}
    assert "## How it was chosen (edgekd fit)" in card.text and "- budget: p50_ms<=5" in card.text
    verify_bundle(str(bundle))
