"""Zip bundles: the --zip round trip through edgekd predict, and zips whose members escape refused."""

import json
import zipfile

import pytest

from edgekd import EdgeKDError


@pytest.fixture(scope="module")
def zipped(digits_run, tmp_path_factory, cli):
    out = tmp_path_factory.mktemp("zip") / "student-onnx"
    cli("export", digits_run / "student.pt", "--format", "onnx", "--val-size", 100, "--zip", "--no-progress",
            "--out", out)
    return out


def _images(tmp_path, n=8):
    from edgekd.core.data import load_data

    data = load_data("digits")
    paths = []
    for i in range(n):
        data.test.images[i].save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    return paths


def test_zip_round_trip_predicts_like_the_folder_and_pytorch(zipped, digits_run, tmp_path, cli_main):
    import torch

    from edgekd.core.loading import load_model
    from edgekd.core.data import load_data

    archive = zipped.parent / "student-onnx.zip"
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == sorted(f"student-onnx/{p.name}" for p in zipped.iterdir())
    paths = _images(tmp_path)
    from_zip = json.loads(cli_main("predict", archive, *paths, "--json").stdout)
    from_folder = json.loads(cli_main("predict", zipped, *paths, "--json").stdout)
    assert from_zip == from_folder
    data = load_data("digits")
    model, _ = load_model(str(digits_run / "student.pt"))
    with torch.no_grad():
        expected = model(torch.stack([data.test[i][0] for i in range(len(paths))])).argmax(1).tolist()
    assert [int(r["top"][0]["label"]) for r in from_zip] == expected


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/evil.txt", "b/../../evil.txt"])
def test_zip_members_that_escape_the_folder_are_refused(tmp_path, member, cli_main):
    from edgekd.bundle import load_bundle

    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("b/manifest.json", "{}")
        z.writestr(member, "x")
    with pytest.raises(EdgeKDError, match="escapes the bundle folder; refusing to unpack it"):
        load_bundle(str(archive))
    assert not (tmp_path.parent / "evil.txt").exists()
    proc = cli_main("predict", archive, tmp_path / "x.png")
    assert proc.returncode == 2 and "escapes the bundle folder" in proc.stderr


def test_zip_symlink_members_are_refused(tmp_path):
    from edgekd.bundle import load_bundle

    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("b/model.onnx")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(EdgeKDError, match="escapes the bundle folder"):
        load_bundle(str(archive))


def test_a_damaged_zip_is_one_line_error(tmp_path, cli_main):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    proc = cli_main("predict", archive, tmp_path / "x.png")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "is a file but not a bundle zip" in proc.stderr
