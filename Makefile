# Two entry points: `make repro` (whole pipeline on the default model) and `make test`.
# Both create .venv and install on first use; later runs reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test compat bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: pip takes the local CPU wheel for ==2.13.0; anything else may pull a CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[build,test]'
	touch $@

repro: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest -q

# sentence-transformers' own ONNX backend (5.x + optimum) in its own venv, for
# tests/test_st_onnx_backend.py: the bundle must load there too.
compat: .venv-st5/.installed-stamp

.venv-st5/.installed-stamp:
	$(PYTHON) -m venv .venv-st5
	.venv-st5/bin/python -m pip install -q torch==2.13.0
	.venv-st5/bin/python -m pip install -q 'sentence-transformers[onnx]>=5,<6'
	touch $@

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -q --benchmark-autosave

clean:
	rm -rf artifacts
