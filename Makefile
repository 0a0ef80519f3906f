# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-arm check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edgekd distill --out runs/default --force
	$(BIN)/edgekd export runs/default/student.pt --format onnx --out runs/default/student-onnx --force
	$(BIN)/edgekd export runs/default/student.pt --format openvino --precision int8 \
		--out runs/default/student-openvino-int8 --force
	$(BIN)/edgekd bench runs/default/teacher.pt runs/default/student.pt runs/default/student-onnx \
		runs/default/student-openvino-int8 --device cpu --out runs/default/bench --force

# The import layers (import-linter), the types of every package (mypy), and no function-level import of a
# light project module (tools/check_imports.py); `make test` runs this first.
check: $(STAMP)
	tools/check_layers.sh
	tools/check_types.sh
	$(BIN)/python tools/check_imports.py

# The suite runs as three pytest processes, split by file name. One process that loads torch, ONNX Runtime,
# OpenVINO and NNCF for all ~480 tests crashed (SIGSEGV) twice, at different tests after about 300 of them;
# three processes keep what each one accumulates small. They run in two lanes at once, one per core of the
# 2-core machines the suite is sized for (most tests wait on a subprocess, a file or a server much of their
# time): tests/test_[j-z]* in the background, its output kept in build/tests-j-z.log and printed when both lanes
# are done, and tests/test_[a-d]* then tests/test_[e-i]* in the foreground (docs/records/suite.md: the lanes'
# times). Each prints its 15 slowest tests; every group runs even when another fails, and the target fails if
# any did.
TESTS_A := $(wildcard tests/test_[a-d]*.py)
TESTS_B := $(wildcard tests/test_[e-i]*.py)
TESTS_C := $(wildcard tests/test_[j-z]*.py)

test: check
	@mkdir -p build; \
	( $(BIN)/python -m pytest -q --durations=15 $(TESTS_C) > build/tests-j-z.log 2>&1; echo $$? > build/tests-j-z.rc ) & \
	lane=$$!; status=0; \
	for group in "$(TESTS_A)" "$(TESTS_B)"; do \
	  $(BIN)/python -m pytest -q --durations=15 $$group || status=1; \
	done; \
	wait $$lane; echo "== tests/test_[j-z]*.py (the other lane) =="; cat build/tests-j-z.log; \
	[ "$$(cat build/tests-j-z.rc)" = 0 ] || status=1; exit $$status

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The device tests on the emulated ARM64 board (tools/arm_device.sh: root and binfmt_misc; built once
# into /var/cache/edgekd-arm, 4-8 minutes, then reused). Skipped, with the reason, where it cannot run.
test-arm: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=10 -m arm tests/test_devices.py tests/test_arm.py

clean:
	rm -rf runs .pytest_cache build/mypy-cache
