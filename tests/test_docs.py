"""The docs tell the truth: the README's quick start runs as written, and every option a doc names exists."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
QUICK_START = "### Quick start, by hand"
# Options of programs that are not edgekd's (pip, pytest, ssh, torchrun, ...), named in the docs.
FOREIGN = {
    "--upgrade", "--quiet", "--platform", "--only-binary", "--target", "--python-version", "--no-deps",
    "--arch", "--variant", "--include", "--durations", "--import-mode", "--nproc-per-node", "--nproc_per_node",
    "--nnodes", "--standalone", "--headless", "--no-cache", "--index-url", "--extra-index-url", "--help",
    "--version", "--debug", "--user", "--editable", "--fix", "--config-file", "--cache-dir", "--slow",
}


def _edgekd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgekd", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _quick_start_lines():
    text = (ROOT / "README.md").read_text()
    assert QUICK_START in text, "the README lost its quick start"
    block = re.search(r"```bash\n(.*?)```", text[text.index(QUICK_START):], re.S)
    assert block, "the quick start has no ```bash block"
    return [line.split() for line in block.group(1).splitlines() if line.startswith("edgekd ")]


@pytest.mark.slow  # a whole CLI pipeline in subprocesses: make test-slow
def test_the_readme_quick_start_runs_as_written(tmp_path):
    lines = _quick_start_lines()
    assert [line[1] for line in lines] == ["distill", "export", "bench"]
    for line in lines:
        proc = _edgekd(*line[1:], cwd=tmp_path)
        assert proc.returncode == 0, f"{' '.join(line)} failed:\n{proc.stderr[-2000:]}"
    assert (tmp_path / "runs/quick/student-onnx/manifest.json").is_file()
    assert (tmp_path / "runs/quick/bench/results.json").is_file()


def _commands():
    listing = _edgekd("--help").stdout
    commands = re.findall(r"^    ([a-z][a-z-]*)\b", listing, re.M)
    assert "distill" in commands, listing
    return commands


def _script_options():
    """Options that tools/ and recipes/ scripts define (the docs name them beside their commands)."""
    names = set()
    for path in [*ROOT.glob("tools/*.py"), *ROOT.glob("recipes/*.py"), *ROOT.glob("tools/*.sh")]:
        names.update(re.findall(r"[\"'](--[a-z][a-z0-9-]*)", path.read_text()))
    return names


@pytest.fixture(scope="module")
def known_options():
    names = set(FOREIGN) | _script_options()
    for command in _commands():
        names.update(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _edgekd(command, "--help").stdout))
    return names


def test_every_option_the_docs_name_exists(known_options):
    missing = {}
    for doc in DOCS:
        for option in re.findall(r"`[^`]*?(?<![\w-])(--[a-z][a-z0-9-]*[a-z0-9])(?![\w-])", doc.read_text()):
            if option not in known_options:
                missing.setdefault(option, doc.name)
    assert not missing, f"options named in the docs that no command or script takes: {missing}"
