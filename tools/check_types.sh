#!/usr/bin/env bash
# Type-checks the torch-free bundle layer and the option tables (pyproject.toml [tool.mypy]) with mypy.
# As for tools/check_layers.sh: bundle/ (and export/, bench/) sit beside edgekd/ and are mapped in only at
# install time, so mypy reads the installed layout staged in build/types.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
stage=build/types
tools/stage_layout.sh "$stage"
cd "$stage" && "../../$BIN/python" -m mypy --config-file ../../pyproject.toml --cache-dir ../mypy-cache
