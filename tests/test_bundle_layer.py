"""The bundle layer: split by concern, the device runner assembled from its modules, the error types in base."""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from edgekd.bundle import assemble

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_shipped_runner_is_assembled_from_the_bundle_modules_and_runs_standalone(tmp_path):
    """Written where edgekd ships it, the runner answers ``env`` with no edgekd on the path, and nothing generated is
    kept in the tree."""
    assert not (ROOT / "bundle/runner.py").exists()
    runner = assemble.write_runner(str(tmp_path / "device_runner.py"))
    assert pathlib.Path(runner).read_text() == assemble.runner_source()
    assert [p.name for p in tmp_path.iterdir()] == ["device_runner.py"]  # the atomic write leaves no temporary file
    for name in ("edgekd", "torch"):  # beside the runner, first on its path: any import of them fails
        (tmp_path / (name + ".py")).write_text("raise ImportError('no %s on a device')\n" % name)
    proc = subprocess.run([sys.executable, "-I", runner, "env"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert {"cpu", "cores", "machine", "python", "versions"} <= set(env)


def test_the_runner_is_python_3_8_syntax():
    ast.parse(assemble.runner_source(), feature_version=(3, 8))


def test_the_runner_defines_each_name_once_per_module_and_imports_no_package_module_standalone():
    tree = ast.parse(assemble.runner_source())
    top = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    names = [n.name for n in top]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    relative = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level]
    assert relative == []  # the package's own imports are dropped; base's names have stand-ins
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"edgekd", "torch", "torchvision"}


def test_an_import_the_runner_cannot_carry_is_refused(monkeypatch):
    monkeypatch.setattr(assemble, "STANDALONE", {"BundleError": assemble.STANDALONE["BundleError"]})
    with pytest.raises(ValueError, match="require_regular from ..base.files"):
        assemble.runner_source()
    monkeypatch.undo()
    backwards = tuple(reversed(assemble.RUNNER_MODULES))  # the entry point first, before what it imports
    monkeypatch.setattr(assemble, "RUNNER_MODULES", backwards)
    with pytest.raises(ValueError, match=f"bundle/{backwards[0]}.py imports from .*, which is not among"):
        assemble.runner_source()


def test_no_edgekd_module_imports_a_runner_module():
    """edgekd imports the bundle package's own modules; the runner is a file made for devices."""
    for path in [*ROOT.glob("edgekd/**/*.py"), *ROOT.glob("bundle/*.py"), *ROOT.glob("export/*.py"),
                 *ROOT.glob("bench/*.py"), *ROOT.glob("fit/*.py")]:
        text = path.read_text()
        assert "bundle.runner" not in text and "bundle import runner" not in text, path


def test_edgekds_error_types_live_in_base():
    import edgekd
    from edgekd.base import errors
    from edgekd.bundle import BundleError, checks

    assert edgekd.EdgeKDError is errors.EdgeKDError and edgekd.Interrupted is errors.Interrupted
    assert BundleError is errors.BundleError is checks.BundleError and issubclass(BundleError, edgekd.EdgeKDError)


def test_the_manifests_input_is_a_record_written_back_key_for_key():
    from edgekd.bundle.manifest import ModelInput

    exported = {"shape": [-1, 3, 32, 48], "layout": "NCHW", "dtype": "float32", "mean": [0.5, 0.5, 1], "std": [0.25] * 3,
                "color": "RGB", "resize": [32, 48], "scale": 1 / 255, "resample": "bilinear", "crop_pct": 0.875,
                "resize_mode": "shorter side, center crop", "from_a_newer_edgekd": {"x": 1}}
    spec = ModelInput.from_json(exported)
    assert (spec.color, spec.resize, spec.crop_pct, spec.shape) == ("RGB", (32, 48), 0.875, [-1, 3, 32, 48])
    assert json.dumps(spec.to_json()) == json.dumps(exported)  # the same keys, order and values (1 stays 1)
    old = {"color": "L", "resize": [8, 8], "mean": [0.5], "std": [0.5]}  # before crop_pct was recorded
    assert ModelInput.from_json(old).crop_pct is None and json.dumps(ModelInput.from_json(old).to_json()) == json.dumps(old)


def test_a_name_two_runner_modules_define_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text('"""A."""\n\nimport os\n\nLIMIT = 1\n\n\ndef size():\n    return os.sep\n')
    (tmp_path / "b.py").write_text('"""B."""\n\nimport json as j\n\nfrom .a import size\n\nLIMIT = 2\n')
    monkeypatch.setattr(assemble, "HERE", str(tmp_path))
    monkeypatch.setattr(assemble, "RUNNER_MODULES", ("a", "b"))
    with pytest.raises(ValueError, match="bundle/a.py and bundle/b.py both define LIMIT"):
        assemble.runner_source()
    (tmp_path / "b.py").write_text('"""B."""\n\nimport json as j\n\nfrom .a import size\n\nOTHER = 2\n')
    assert "import json as j\nimport os\n" in assemble.runner_source()  # an import's own name is kept
