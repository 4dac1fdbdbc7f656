"""The bundle is a sentence-transformers folder: SentenceTransformer(bundle, backend="onnx")
loads it. That backend needs sentence-transformers[onnx] (5.x, with optimum), which conflicts
with the build side's sentence-transformers, so it runs in its own venv: `make compat`."""

import json
import subprocess

import pytest

import numpy as np

from conftest import REPO, SENTENCES, build_bundle, fast_params, make_st_model, st_encode

COMPAT_PYTHON = REPO / ".venv-st5" / "bin" / "python"


@pytest.mark.skipif(not COMPAT_PYTHON.exists(), reason="no .venv-st5 with sentence-transformers[onnx]: run `make compat`")
@pytest.mark.parametrize("stack", ["mean+normalize", "cls+max pooling, dense tanh"])
def test_sentence_transformers_onnx_backend_loads_the_bundle(stack, tiny_bundle, tiny_model, tmp_path, params):
    if stack != "mean+normalize":
        tiny_model = make_st_model(tmp_path / "m", pooling=("cls", "max"), normalize=False,
                                   dense=[(12, "torch.nn.modules.activation.Tanh", True)])
        tiny_bundle = build_bundle(tiny_model, tmp_path / "b", fast_params(params), fp16=False)
    corpus = tmp_path / "s.jsonl"
    corpus.write_text("".join(json.dumps(s) + "\n" for s in SENTENCES))
    np.save(tmp_path / "ref.npy", st_encode(tiny_model, SENTENCES))
    result = subprocess.run([str(COMPAT_PYTHON), str(REPO / "tests/compat/st_onnx_backend.py"), str(tiny_bundle),
                             str(tmp_path / "ref.npy"), str(corpus), "0.99999"], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["min_cosine"] >= 0.99999
