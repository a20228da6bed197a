# One command sets up and tests; one sets up and runs the demo.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo install lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 first: it is the CPU wheel on the project machines (a bare `torch` would pull a CUDA build).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.4,<2.15"
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/labelstore demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark prints a table and writes benchmarks/results/*.json (tens of minutes on 2 cores).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_codecs.py --rows 256
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_extract.py
	$(BIN)/python benchmarks/bench_losses.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_compile.py --threads 1
	$(BIN)/labelstore bench --demo-positions 2048 --synthetic-positions 512 --out benchmarks/results
	$(BIN)/python benchmarks/corrupt_store.py --trials 260
	$(BIN)/python benchmarks/hostile_store.py
	$(BIN)/python benchmarks/chaos_compile.py --trials 24
	$(BIN)/python benchmarks/bench_students.py

clean:
	rm -rf $(VENV) build *.egg-info
