"""Nothing lost: an output never replaces an input, --force replaces only edgekd's own outputs, one run
per folder at a time, no temporary left behind by a killed run, a failed run leaves the folder as it
found it. Refusals run through the CLI's entry point in this process; runs that hold a lock, are killed or
must finish run as a subprocess, as a user runs them."""

import os
import signal
import subprocess
import sys
import time

import pytest


def _tree(folder):
    """Every file under ``folder`` with its bytes: what 'intact' means."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".edgekd.lock"}  # the lock file names its latest holder


def _one_line_error(proc, message):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert message in lines[0], lines[0]


def _temporaries(*folders):
    return [p for f in folders if f.exists() for p in f.rglob("*edgekd-tmp-*")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cli):
    """A real, short training run (compact-student, 1 epoch on digits): a folder edgekd wrote."""
    out = tmp_path_factory.mktemp("nl") / "run"
    cli("train", "--model", "compact-student", "--epochs", 1, "--out", out, "--no-progress")
    return out


def _start(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "edgekd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(proc, found, what, timeout=600):
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if found():
            return
        assert proc.poll() is None, f"finished before {what}: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError(f"no {what}")


def test_export_into_the_folder_of_its_checkpoint_is_refused_and_the_folder_is_intact(run, cli_main):
    before = _tree(run)
    for extra in ([], ["--force"], ["--force", "--zip"]):
        proc = cli_main("export", run / "model.pt", "--format", "onnx", "--out", run, *extra)
        _one_line_error(proc, f"CHECKPOINT '{run / 'model.pt'}' is inside --out '{run}', which this run replaces")
        assert _tree(run) == before
    assert not (run.parent / "run.zip").exists()


@pytest.mark.parametrize("command, args, option", [
    ("train", ["--model", "{run}/model.pt"], "--model"),
    ("distill", ["--teacher", "{run}/model.pt"], "--teacher"),
    ("bench", ["{run}/model.pt"], "MODEL"),
])
def test_a_run_into_the_folder_holding_its_input_is_refused(run, cli_main, command, args, option):
    before = _tree(run)
    proc = cli_main(command, *[a.format(run=run) for a in args], "--out", run, "--force")
    _one_line_error(proc, f"{option} '{run}/model.pt' is inside --out '{run}', which this run replaces")
    assert _tree(run) == before


def test_zip_and_force_never_replace_what_edgekd_did_not_write(run, tmp_path, cli_main):
    unrelated = tmp_path / "bundle.zip"
    unrelated.write_bytes(b"my own archive, not a bundle")
    proc = cli_main("export", run / "model.pt", "--format", "onnx", "--zip", "--out", tmp_path / "bundle")
    _one_line_error(proc, f"'{unrelated}' already exists; pass --force")
    proc = cli_main("export", run / "model.pt", "--format", "onnx", "--zip", "--force", "--out", tmp_path / "bundle")
    _one_line_error(proc, f"'{unrelated}' is not a bundle zip written by edgekd")
    assert unrelated.read_bytes() == b"my own archive, not a bundle" and not (tmp_path / "bundle").exists()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for command, args in (("export", [run / "model.pt", "--format", "onnx"]), ("bench", [run / "model.pt"]),
                          ("train", []), ("distill", [])):
        proc = cli_main(command, *args, "--out", mine, "--force")
        _one_line_error(proc, f"output folder '{mine}' was not written by edgekd (it holds notes.txt)")
        assert sorted(os.listdir(mine)) == ["notes.txt"], command


def test_two_distills_into_one_folder_one_refuses_with_the_holders_pid(run, tmp_path, cli):
    out = tmp_path / "d"
    args = ["distill", "--teacher", run / "model.pt", "--epochs", 2, "--out", out, "--no-progress"]
    first = _start(*args)
    _wait_for(first, lambda: (out / ".edgekd").exists(), "lock and marker")
    second = cli(*args, check=False)
    _one_line_error(second, f"output folder '{out}' is in use by another edgekd run (pid {first.pid}, edgekd distill)")
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2 and (out / "student.pt").exists()
    # the lock dies with its process: a run killed while holding it blocks nobody, and what it set
    # aside of the earlier run (a temporary of a process that is gone) is removed by the next run
    third = _start("distill", "--teacher", run / "model.pt", "--epochs", 2, "--out", out, "--force", "--no-progress")
    _wait_for(third, lambda: f"pid {third.pid}" in (out / ".edgekd.lock").read_text(), "the lock taken")
    third.send_signal(signal.SIGKILL)
    third.wait()
    proc = cli("distill", "--teacher", run / "model.pt", "--epochs", 1, "--out", out, "--force", "--no-progress",
               check=False)
    assert proc.returncode == 0, proc.stderr
    assert not _temporaries(out)


def test_a_killed_export_leaves_no_temporary_after_the_next_run(run, tmp_path, cli):
    tmp = tmp_path / "tmp"  # the system temporary folder of these runs, so the check sees only theirs
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    parent = tmp_path / "bundles"
    parent.mkdir()
    proc = _start("export", run / "model.pt", "--format", "onnx", "--out", parent / "b", "--no-progress", env=env)
    _wait_for(proc, lambda: _temporaries(parent, tmp), "staging folder")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _temporaries(parent, tmp) and not (parent / "b").exists()  # what a SIGKILL leaves
    rerun = subprocess.run([sys.executable, "-m", "edgekd", "export", run / "model.pt", "--format", "onnx", "--out",
                            parent / "b", "--zip", "--no-progress"], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not _temporaries(parent, tmp), _temporaries(parent, tmp)
    assert sorted(os.listdir(parent)) == ["b", "b.zip"] and (parent / "b" / "manifest.json").exists()
    # --force over its own bundle (and zip) is allowed: that is what edgekd wrote
    again = subprocess.run([sys.executable, "-m", "edgekd", "export", run / "model.pt", "--format", "onnx", "--out",
                            parent / "b", "--zip", "--force", "--no-progress"], capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(parent)) == ["b", "b.zip"]


def _two_class_folder(root):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i in range(40):
        folder = root / ("test" if i % 4 == 0 else "train") / f"c{int(d.target[i]) % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), "L").save(folder / f"{i:03d}.png")
    return root


def test_a_failed_run_leaves_the_folder_as_it_found_it_so_the_retry_needs_no_force(run, tmp_path, cli, cli_main):
    # Bad input found after config.yaml was written: the teacher has 10 classes, the data 2.
    data = _two_class_folder(tmp_path / "two")
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for out in (new, empty):
        proc = cli_main("distill", "--teacher", run / "model.pt", "--data", data, "--epochs", 1, "--out", out,
                        "--no-progress")
        _one_line_error(proc, "has 10 classes but the data has 2")
    assert not new.exists() and os.listdir(empty) == []
    # A NaN loss mid-training: nothing of the failed run stays, and the earlier run's files come back.
    before = _tree(run)
    proc = cli_main("train", "--model", "seed-teacher", "--lr", "9", "--epochs", 1, "--out", run, "--force",
                    "--no-progress")
    _one_line_error(proc, "in epoch 1, batch")
    assert _tree(run) == before
    proc = cli_main("train", "--model", "seed-teacher", "--lr", "9", "--epochs", 1, "--out", empty, "--no-progress")
    _one_line_error(proc, "in epoch 1, batch")
    assert os.listdir(empty) == []
    cli("distill", "--teacher", run / "model.pt", "--epochs", 1, "--out", empty, "--no-progress")  # no --force needed
    assert (empty / "student.pt").exists() and (empty / "config.yaml").exists()
