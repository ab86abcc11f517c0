# `make demo` and `make test` each bring .venv up to date first, so both work on a fresh clone.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Pinned exactly: this version has a local CPU wheel; anything looser pulls a CUDA build.
TORCH   := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv demo test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/abs demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check abs_deploy tests runtime_tests benchmarks
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check abs_deploy tests runtime_tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
