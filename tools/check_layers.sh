#!/usr/bin/env bash
# Checks edgekd's import layers (pyproject.toml [tool.importlinter]) with import-linter.
# import-linter walks a package's folder on disk, but export/, bench/ and bundle/ sit beside edgekd/
# and are mapped in only at install time; so stage the installed layout in build/layers and lint that.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
stage=build/layers
tools/stage_layout.sh "$stage"
# Through the venv's python, not its lint-imports script: a worktree venv that reuses another
# venv's packages (a .pth file) has the package but not the script.
cd "$stage" && PYTHONPATH=. "../../$BIN/python" -c \
    'import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())' \
    ../../pyproject.toml --no-cache
