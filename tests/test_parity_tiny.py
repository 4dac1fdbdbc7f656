"""The runtime gives SentenceTransformer.encode's embeddings for every module type.

Each case builds a tiny random model, runs the real stages into a bundle, loads it with
sbert_bundle and compares every variant with sentence-transformers (PyTorch).
"""

import numpy as np
import pytest

from conftest import SENTENCES, build_bundle, fast_params, make_st_model, st_encode
from sbert_bundle import Bundle

TANH = "torch.nn.modules.activation.Tanh"
IDENTITY = "torch.nn.modules.linear.Identity"
GELU = "torch.nn.modules.activation.GELU"

CASES = {
    "mean+normalize": dict(pooling=("mean",)),
    "cls+dense-tanh": dict(pooling=("cls",), dense=[(16, TANH, True)], normalize=False),
    "max+mean concat, dense identity no bias": dict(pooling=("max", "mean"), dense=[(24, IDENTITY, False)]),
    "mean_sqrt_len_tokens": dict(pooling=("mean_sqrt_len_tokens",), normalize=False),
    "weightedmean": dict(pooling=("weightedmean",)),
    "lasttoken + two dense (gelu, tanh)": dict(pooling=("lasttoken",), dense=[(20, GELU, True), (8, TANH, True)]),
    "all six modes": dict(pooling=("cls", "lasttoken", "max", "mean", "mean_sqrt_len_tokens", "weightedmean")),
    "distilbert (no token_type_ids)": dict(arch="distilbert", pooling=("mean",)),
    "mpnet (relative positions)": dict(arch="mpnet", pooling=("mean",)),
    "do_lower_case, max_seq_length 12": dict(do_lower_case=True, max_seq_length=12, pooling=("mean",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bundle_matches_sentence_transformers(case, tmp_path, params):
    model = make_st_model(tmp_path / "model", **CASES[case])
    bundle_dir = build_bundle(model, tmp_path / "build", fast_params(params), fp16=False)
    ref = st_encode(model, SENTENCES)
    for variant in ("fp32", "fp32-fused"):
        emb = Bundle.load(bundle_dir, variant=variant).encode(SENTENCES, batch_size=4)
        assert emb.dtype == np.float32 and emb.shape == ref.shape
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.99999, (variant, SENTENCES[int(cos.argmin())], cos.min())
        np.testing.assert_allclose(emb, ref, atol=2e-4, rtol=1e-3)


def test_fp16_variants_match(tiny_bundle, tiny_model):
    ref = st_encode(tiny_model, SENTENCES)
    for variant in ("fp16", "fp16-fused"):
        emb = Bundle.load(tiny_bundle, variant=variant).encode(SENTENCES)
        cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.999, (variant, cos.min())


def test_legacy_do_lower_case_config(tmp_path, params):
    """Older models say do_lower_case / max_seq_length in sentence_bert_config.json."""
    import json

    model = make_st_model(tmp_path / "model")
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 10, "do_lower_case": True}))
    bundle = Bundle.load(build_bundle(model, tmp_path / "b", fast_params(params), fp16=False), variant="fp32")
    assert (bundle.head.do_lower_case, bundle.head.max_seq_length) == (True, 10)
    mixed = ["HELLO World", "hello world", "The Quick BROWN fox " * 5]
    ref = st_encode(model, mixed)
    emb = bundle.encode(mixed)
    np.testing.assert_allclose(emb, ref, atol=2e-4)
    np.testing.assert_allclose(emb[0], emb[1], atol=1e-6)


def test_truncation_to_max_seq_length(tmp_path, params):
    model = make_st_model(tmp_path / "model", max_seq_length=8)
    bundle = Bundle.load(build_bundle(model, tmp_path / "b", fast_params(params), fp16=False), variant="fp32")
    ids = bundle.tokenizer(["the cat " * 40])["input_ids"]
    assert ids.shape == (1, 8)
    # words past the limit do not change the embedding
    a, b = bundle.encode(["the cat sat on the mat and the dog", "the cat sat on the mat and the dog sat in the park"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fp16_of_a_graph_with_casts_to_float(tmp_path, params):
    """MPNet's graph casts to float; onnxconverter-common mistypes such casts unless they stay fp32."""
    import copy

    from stages.common import StageError

    model = make_st_model(tmp_path / "model", arch="mpnet")
    p = fast_params(params)
    bundle = Bundle.load(build_bundle(model, tmp_path / "ok", p), variant="fp16")
    ref = st_encode(model, SENTENCES)
    emb = bundle.encode(SENTENCES)
    cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.999
    broken = copy.deepcopy(p)
    broken["fp16"]["keep_casts_to_float"] = False
    with pytest.raises(StageError, match="converted graph model_fp16.onnx is invalid"):
        build_bundle(model, tmp_path / "broken", broken)


def test_left_truncation_matches_sentence_transformers(tmp_path, params):
    import json

    model = make_st_model(tmp_path / "model", max_seq_length=8)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["truncation_side"] = "left"
    cfg_path.write_text(json.dumps(cfg))
    bundle = Bundle.load(build_bundle(model, tmp_path / "b", fast_params(params), fp16=False), variant="fp32")
    assert bundle.head.truncation_side == "left"
    long = ["the quick brown fox jumps over the lazy dog and the cat sat on the mat in the park"]
    np.testing.assert_allclose(bundle.encode(long), st_encode(model, long), atol=2e-4)
