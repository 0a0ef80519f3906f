"""Reliability: nothing half-written, one-line answers to OS failures, no tracebacks unless --debug."""

import errno
import os

import pytest

from edgekd import cli
from edgekd.checkpoint import atomic_write


def _disk_full_after_some_bytes(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", tmp)


def test_disk_full_while_writing_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    path = tmp_path / "student.pt"
    path.write_bytes(b"the previous good checkpoint")
    with pytest.raises(OSError):
        atomic_write(str(path), _disk_full_after_some_bytes)
    assert path.read_bytes() == b"the previous good checkpoint"
    assert os.listdir(tmp_path) == ["student.pt"]


@pytest.mark.parametrize("error, code, message", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/model.pt"), 2, "no space left on the device while writing '/x/model.pt'"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 2, "permission denied for '/ro/out'"),
    (RuntimeError("something broke\nmore"), 1, "internal error: RuntimeError: something broke (rerun with --debug"),
])
def test_failures_become_one_line(monkeypatch, capsys, error, code, message):
    def boom(self, args):
        raise error

    monkeypatch.setattr(cli.Predict, "run", boom)
    assert cli.main(["predict", "b", "x.png"]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(type(error)):
        cli.main(["--debug", "predict", "b", "x.png"])


def test_output_inside_a_file_or_unwritable_is_refused(tmp_path, monkeypatch):
    from edgekd import EdgeKDError

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(EdgeKDError, match="not writable"):
        cli._check_out(str(blocker / "out"), force=False)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a user without write permission
    with pytest.raises(EdgeKDError, match="is not writable"):
        cli._check_out(str(tmp_path / "new"), force=False)
