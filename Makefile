# One venv for everything; `make demo` and `make test` each install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Without CUDA, install this CPU build of torch before xtune so that xtune's plain `torch`
# requirement is already satisfied and pip never pulls a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2

.PHONY: install demo demo-grpo test test-all bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing torch from the package index"; $(BIN)/pip install -q torch; \
	else \
		echo "no CUDA: installing $(TORCH_CPU) (CPU)"; $(BIN)/pip install -q "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/xtune sft recipe=demo

# Online RL from the SFT demo's model (trained first into work_dirs/demo/sft when absent).
demo-grpo: install
	@test -f work_dirs/demo/sft/hf/config.json || $(BIN)/xtune sft recipe=demo train.work_dir=work_dirs/demo/sft
	$(BIN)/xtune grpo recipe=demo_grpo

# Two pytest workers, whole files each (module fixtures are built once): the suite's multi-process tests
# leave a core idle while their processes start, and this fills it (~22 min -> ~10 min on 2 cores).
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu"

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python bench/run.py

# ruff (style, imports, pyupgrade, bugbear, docstring layout) and mypy against its shrinking baseline.
lint: install
	$(BIN)/python -m ruff check src tests bench tools/typecheck.py
	$(BIN)/python tools/typecheck.py

clean:
	rm -rf $(VENV) work_dirs dist build .mypy_cache
