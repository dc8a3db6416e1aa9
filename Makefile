# One-command entry points. Override the torch pin for a GPU build, e.g. `make demo TORCH=torch`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/evomerge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/evomerge  ## create .venv with evomerge, torch (CPU build by default) and the dev tools

demo: setup  ## the main job: M2N2 from scratch on sklearn digits, 50,000 evaluations (about a minute on 2 cores)
	$(BIN)/evomerge run search_spaces/m2n2_digits_scratch.yaml --name m2n2-digits-scratch-$(shell date +%Y%m%d-%H%M%S)

lint: setup
	$(BIN)/ruff check evomerge tests benchmarks

test: setup lint  ## lint, then the whole test suite
	$(BIN)/python -m pytest -q

bench: setup  ## ladder step 1: M2N2 and baselines on digits, 10 seeds (about an hour on 2 cores)
	$(BIN)/python benchmarks/m2n2_digits.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
