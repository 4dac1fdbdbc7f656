# Two entry points: `make repro` (whole pipeline on the default model) and `make test`.
# Both create .venv and install on first use; later runs reuse it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

# The build and test environment is locked (versions and sha256 of every file, torch the
# local CPU wheel): requirements/lock-py311.txt, compiled by `make lock` from pyproject.toml's
# `build`, `test`, `cluster`, `corpus`, `serve`, `serve-ray` and `docs` extras plus requirements/lock.in. The lock is for CPython 3.11 on Linux x86_64.
LOCK       := requirements/lock-py311.txt
UV_VERSION := 0.13.9
# Where pip (through its config) and `make lock` find the torch CPU wheel.
FIND_LINKS ?= /opt/wheels

.PHONY: install lock repro matrix test docs docs-serve publish compat peers-venv bench rebuild-check clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every package from the lock, checked against its hashes; then the project itself without
# resolving anything (setuptools, the build backend, comes from the lock as well).
$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the lock: the newest versions pyproject.toml's ranges allow today.
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml requirements/lock.in --extra build --extra test --extra cluster --extra corpus --extra serve --extra serve-ray --extra docs \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	  --find-links $(FIND_LINKS) --custom-compile-command 'make lock' -o $(LOCK)

repro: $(STAMP)
	$(BIN)/dvc repro
	$(BIN)/python -m stages.report

# The build matrix on Ray (every model of params.yaml, build_trt per GPU target): a local Ray,
# or the cluster at RAY_ADDRESS. See docs/matrix.md.
matrix: $(STAMP)
	$(BIN)/python -m stages.matrix $(if $(MODELS),--models $(MODELS))

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor, a page
# missing from the nav, or a result file with no renderer fails the build. The CLI, stage and
# params.yaml references and the benchmark tables are generated during the build (docs/gen/).
# The two variables silence the banners that mkdocs-material and properdocs print about MkDocs 2.
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true
docs: $(STAMP)
	$(DOCS_ENV) $(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(DOCS_ENV) $(BIN)/mkdocs serve

# Publish the sealed release (after `make repro`, on a clean, committed tree): push it to the
# DVC remote, then tag the version (GTO); STAGE=prod also assigns a stage. With several models
# in params.yaml, MODEL=<key> names the one to publish.
publish: $(STAMP)
	$(BIN)/python -m stages.publish $(if $(MODEL),--model $(MODEL)) $(if $(STAGE),--stage $(STAGE))

# sentence-transformers' own ONNX backend (5.x + optimum) in its own venv, for
# tests/test_st_onnx_backend.py: the bundle must load there too. Not locked: it only loads
# bundles in a test, it builds nothing.
compat: .venv-st5/.installed-stamp

.venv-st5/.installed-stamp:
	$(PYTHON) -m venv .venv-st5
	.venv-st5/bin/python -m pip install -q torch==2.13.0
	.venv-st5/bin/python -m pip install -q 'sentence-transformers[onnx]>=5,<6'
	touch $@

# The peers of tests/benchmarks/peers.py (sentence-transformers 5 with its ONNX and OpenVINO
# backends, fastembed, openvino) in their own venv. Not locked: it only times peers, it builds nothing.
peers-venv: .venv-peers/.installed-stamp

.venv-peers/.installed-stamp:
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q torch==2.13.0
	.venv-peers/bin/python -m pip install -q 'sentence-transformers[onnx,openvino]>=5,<6' fastembed openvino nncf
	touch $@

# Rebuild HEAD (or REV=...) in a temporary clone and compare every output with its dvc.lock:
# every build output up to package (bundle.tar.gz included) must be the same bytes on any x86-64
# CPU; verify's report and the release hold parity measured here, so on another CPU type they may
# differ (printed, not failed). ARCHIVE=path/to/name-version.tar.gz: a published release must come
# back bit for bit with its own report; MODEL=<key> names its model where REV builds several.
# EMULATE_CPU=Haswell-noTSX: the stages up to package under qemu-user's AVX2-only CPU (slow).
REV ?= HEAD
rebuild-check: $(STAMP)
	$(BIN)/python -m stages.rebuild_check $(REV) $(if $(MODEL),--model $(MODEL)) $(if $(ARCHIVE),--archive $(ARCHIVE)) $(if $(EMULATE_CPU),--emulate-cpu $(EMULATE_CPU))

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -q --benchmark-autosave

clean:
	rm -rf artifacts
