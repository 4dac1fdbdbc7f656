"""Benchmarks run on the bundle that `make repro` built (artifacts/minilm_l6/bundle)."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "artifacts" / "minilm_l6" / "bundle"
REFERENCE = REPO / "artifacts" / "minilm_l6" / "source" / "model"


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    path = REPO / "stages" / "data" / "eval_corpus.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip(f"no bundle at {BUNDLE}: run `make repro` first")
    return BUNDLE


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE
