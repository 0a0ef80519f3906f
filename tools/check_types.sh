#!/usr/bin/env bash
# Type-checks the torch-free bundle layer and the option tables (pyproject.toml [tool.mypy]) with mypy;
# it finds edgekd.bundle through the link edgekd/bundle, as tools/check_layers.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
"$BIN/python" -m mypy --config-file pyproject.toml --cache-dir build/mypy-cache
