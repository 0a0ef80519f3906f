#!/usr/bin/env bash
# Usage: tools/stage_layout.sh DIR — copies the source into DIR in its installed layout (edgekd/ with
# export/, bench/ and bundle/ inside it, as pyproject.toml's package-dir maps them at install time).
# import-linter and mypy read packages from folders on disk, so they check this staged copy.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$1
rm -rf "$stage" && mkdir -p "$stage"
cp -r edgekd "$stage/edgekd"
for sub in export bench bundle; do cp -r "$sub" "$stage/edgekd/$sub"; done
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
