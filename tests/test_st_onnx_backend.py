"""The bundle is a sentence-transformers folder: SentenceTransformer(bundle, backend="onnx")
loads it. That backend needs sentence-transformers[onnx] (5.x, with optimum), which conflicts
with the build side's sentence-transformers, so it runs in its own venv: `make compat`."""

import json
import subprocess

import pytest

from conftest import REPO, SENTENCES

COMPAT_PYTHON = REPO / ".venv-st5" / "bin" / "python"


@pytest.mark.skipif(not COMPAT_PYTHON.exists(), reason="no .venv-st5 with sentence-transformers[onnx]: run `make compat`")
def test_sentence_transformers_onnx_backend_loads_the_bundle(tiny_bundle, tiny_model, tmp_path):
    corpus = tmp_path / "s.jsonl"
    corpus.write_text("".join(json.dumps(s) + "\n" for s in SENTENCES))
    result = subprocess.run([str(COMPAT_PYTHON), str(REPO / "tests/compat/st_onnx_backend.py"), str(tiny_bundle),
                             str(tiny_model), str(corpus), "0.99999"], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["min_cosine"] >= 0.99999
