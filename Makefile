# The README's two commands: `make run` (set-up + the whole stack on its embedded default) and
# `make test` (set-up + the whole suite). Both start from nothing but this repository.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel lies on this machine kind's disk; GPU users install their CUDA torch first (any torch that
# already imports in the venv is kept).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup run test clean prometheus

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/tdserve run

# tests/integration/test_metrics.py runs a real Prometheus: Debian's package, installed here when missing and
# apt-get can be used (root, or sudo without a password). Elsewhere that one test skips and says why.
prometheus:
	@command -v prometheus >/dev/null || ! command -v apt-get >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo -n"; fi; \
	  ($$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends prometheus) \
	    >/dev/null 2>&1 || echo "make: could not install prometheus; its test will skip"; }

test: setup prometheus
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
