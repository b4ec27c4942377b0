# qaclims: the two commands a user needs are `make test` and `make study`.
# Every target sets up .venv first if needed (idempotent: a second run installs nothing).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qaclims-installed
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: setup test test-slow study bench lab export clean-nbs help

help:
	@echo "make setup   create $(VENV) and install qaclims with its dependencies (once)"
	@echo "make test    check notebooks and package agree, run notebook tests and pytest"
	@echo "make study   run every table and ablation of study.yaml (finished rows are skipped): results/, figures/"
	@echo "make bench   print the benchmark table"
	@echo "make lab     start JupyterLab on nbs/"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# torch and torchvision first, pinned, so that no resolver picks another build
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (qaclims)" > /dev/null
	@touch $(STAMP)

export: setup
	@bash tools/check_export.sh $(BIN)

test: setup export
	# one torch thread per notebook process: two processes share the two cores
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2
	$(BIN)/python -m pytest tests/

test-slow: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --flags slow --cell-timeout 0
	$(BIN)/python -m pytest tests/ -m slow

# Two rows at a time, one torch thread each (the default scale is sized for this on 2 cores). STUDY_ARGS passes
# options to `qaclims study`, e.g. make study STUDY_ARGS="--scale full" or STUDY_ARGS="--tables main fat"
STUDY_JOBS ?= 2
study: setup
	$(BIN)/qaclims study --jobs $(STUDY_JOBS) $(STUDY_ARGS)

bench: setup
	$(BIN)/qaclims bench

lab: setup
	$(BIN)/jupyter lab nbs/

clean-nbs: setup
	$(BIN)/nbdev-clean
