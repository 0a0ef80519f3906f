#!/usr/bin/env bash
# Checks edgekd's import layers (pyproject.toml [tool.importlinter]) with import-linter.
# export/, bench/ and bundle/ sit beside edgekd/ and are installed as edgekd.export, edgekd.bench and
# edgekd.bundle; the links edgekd/export, edgekd/bench and edgekd/bundle show import-linter (which walks a
# package's folder on disk) the installed layout, so plain `lint-imports` in the repository works too.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
# Through the venv's python, not its lint-imports script: a venv that reuses another venv's packages
# (a .pth file) has the package but not the script.
"$BIN/python" -c 'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' \
    pyproject.toml --no-cache
