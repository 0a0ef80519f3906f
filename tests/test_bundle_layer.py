"""The bundle layer: split by concern, the device runner generated from its modules, the error types in base."""

import ast
import pathlib

from edgekd.bundle import assemble

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_shipped_runner_is_generated_from_the_bundle_modules():
    """bundle/runner.py is what ``python bundle/assemble.py`` writes (edit the modules, then run it)."""
    assert (ROOT / "bundle/runner.py").read_text() == assemble.runner_source()


def test_the_runner_defines_each_name_once_per_module_and_imports_no_package_module_standalone():
    tree = ast.parse(assemble.runner_source())
    top = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    names = [n.name for n in top]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    relative = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level]
    assert relative == []  # the package's own imports sit only under `if __package__:`


def test_edgekds_error_types_live_in_base():
    import edgekd
    from edgekd.base import errors
    from edgekd.bundle import BundleError, runner

    assert edgekd.EdgeKDError is errors.EdgeKDError and edgekd.Interrupted is errors.Interrupted
    assert BundleError is errors.BundleError is runner.BundleError and issubclass(BundleError, edgekd.EdgeKDError)
