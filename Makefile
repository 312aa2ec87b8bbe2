# The two commands of the README:
#   make demo   - the main job (installs everything it needs, then runs it)
#   make test   - the test suite (installs everything it needs, then runs it)
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.alm-installed

.PHONY: setup demo test test-fast experiments-check bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[dev]"
	$(VPY) -m alm.assets install
	$(VPY) -m alm.eval.tasks build
	touch $(STAMP)

setup: $(STAMP)

# Tokenizer transfer SmolLM2-135M -> Qwen3 tokenizer by ALM on the offline
# corpus; ends with held-out bits per byte (teacher, FVT init, ALM student).
# A finished run is not redone: `rm -rf runs/demo` to start over.
demo: $(STAMP)
	$(VPY) -m experiments.transfer_tokenizer --out_dir=runs/demo

# Two pytest workers (one per core of the CI machine); a test file stays on one
# worker so its module-scoped model loads happen once. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not experiment" tests

# Skips the tests that load the real models.
test-fast: $(STAMP)
	$(VPY) -m pytest -q -m "not slow and not experiment" tests

# The long real-model comparisons (ALM vs SFT direction; minutes each).
experiments-check: $(STAMP)
	$(VPY) -m pytest -q -m experiment tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
