"""The model zoo: each popular sentence-transformers family converts with fp32 parity, or is refused.

Every family is a tiny random model of its architecture, with a tokenizer of its kind built with
the `tokenizers` library (WordPiece, SentencePiece-style Unigram, byte-level BPE), saved by
sentence-transformers and run through the real stages. Parity is measured on the evaluation
corpus (long inputs, nine scripts, empty strings) against SentenceTransformer.encode, in
batches of mixed lengths; docs/model-zoo.md's table cites these tests.
"""

import json
import shutil

import numpy as np
import pytest

from conftest import REPO, SENTENCES, build_bundle, fast_params, make_st_model, make_zoo_model, st_encode
from sbert_bundle import Bundle
from stages import build_trt, split
from stages.common import StageError

TANH = "torch.nn.modules.activation.Tanh"
CORPUS = [json.loads(line) for line in (REPO / "stages/data/eval_corpus.jsonl").read_text().splitlines()]
FP32_GATE = 0.99999


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def st_model(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu")


def assert_parity(bundle_dir, model_dir, sentences=CORPUS, **encode_kwargs):
    """fp32 and fp32-fused against sentence-transformers at the fp32 gate; returns the figures."""
    ref = st_model(model_dir).encode(sentences, batch_size=16, convert_to_numpy=True, **encode_kwargs)
    figures = {}
    for variant in ("fp32", "fp32-fused"):
        emb = Bundle.load(bundle_dir, variant=variant).encode(sentences, batch_size=8, **encode_kwargs)
        figures[variant] = min_cosine(emb, ref)
        assert figures[variant] >= FP32_GATE, (variant, encode_kwargs, figures[variant])
    return figures


def build(tmp_path_factory, params, name, maker, **kw):
    model = maker(tmp_path_factory.mktemp(name) / "model", **kw)
    return model, build_bundle(model, tmp_path_factory.mktemp(f"{name}-build"), fast_params(params), fp16=False)


@pytest.fixture(scope="module")
def e5(tmp_path_factory, params):
    """multilingual-e5 style: XLM-R, Unigram tokenizer, no token_type_ids, query/passage prompts."""
    return build(tmp_path_factory, params, "e5", make_zoo_model, family="xlm-roberta",
                 prompts={"query": "query: ", "passage": "passage: "})


@pytest.fixture(scope="module")
def instructor(tmp_path_factory, params):
    """A default prompt left out of pooling (include_prompt false), every mode the mask changes."""
    return build(tmp_path_factory, params, "instructor", make_zoo_model, family="xlm-roberta",
                 pooling=("cls", "mean", "weightedmean", "max"), include_prompt=False,
                 prompts={"query": "Represent the query for retrieval: ", "passage": ""},
                 default_prompt_name="query")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, params):
    """Qwen3-Embedding style: decoder, byte-level BPE with <|endoftext|> appended, left padding,
    last-token pooling (with mean beside it, prompt left out, to test the left-padded prompt mask)."""
    return build(tmp_path_factory, params, "qwen2", make_zoo_model, family="qwen2", padding_side="left",
                 pooling=("lasttoken", "mean"), include_prompt=False,
                 prompts={"query": "Instruct: find the document\nQuery: ", "document": ""},
                 default_prompt_name="query")


def test_xlm_roberta_e5_converts_with_parity(e5):
    model, bundle_dir = e5
    head = Bundle.load(bundle_dir, variant="fp32").head
    assert head.prompts == st_model(model).prompts and head.prompts["query"] == "query: "
    assert head.default_prompt_name is None
    onnx_report = json.loads((bundle_dir.parent / "onnx" / "report.json").read_text())
    assert onnx_report["input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids
    assert onnx_report["fusion"].get("Attention") == 2 and "fusion_notes" not in onnx_report
    assert_parity(bundle_dir, model)
    assert_parity(bundle_dir, model, prompt_name="query")
    assert_parity(bundle_dir, model, prompt="passage: ")


def test_results_do_not_depend_on_batching(e5, decoder):
    for _, bundle_dir in (e5, decoder):
        bundle = Bundle.load(bundle_dir, variant="fp32")
        batched = bundle.encode(CORPUS[:40], batch_size=16, max_batch_tokens=None)
        alone = np.stack([bundle.encode(s) for s in CORPUS[:40]])
        assert min_cosine(batched, alone) > 0.999999, bundle_dir


def test_default_prompt_and_include_prompt_false_match(instructor):
    model, bundle_dir = instructor
    head = Bundle.load(bundle_dir, variant="fp32").head
    assert head.default_prompt_name == "query"
    assert_parity(bundle_dir, model)  # the default prompt, left out of pooling
    assert_parity(bundle_dir, model, prompt_name="passage")  # the empty prompt: nothing left out
    assert_parity(bundle_dir, model, prompt="a much longer instruction for this test: ")
    # the prompt really is excluded: an embedding without it differs
    bundle = Bundle.load(bundle_dir, variant="fp32")
    with_default = bundle.encode(SENTENCES[:3])
    assert min_cosine(with_default, bundle.encode(SENTENCES[:3], prompt="")) < 0.999


def test_decoder_left_padding_last_token_with_prompts(decoder):
    model, bundle_dir = decoder
    bundle = Bundle.load(bundle_dir, variant="fp32-fused")
    assert bundle.head.padding_side == "left"
    assert bundle.tokenizer(["a", "a longer one"])["attention_mask"][0, 0] == 0  # padded on the left
    report = json.loads((bundle_dir.parent / "onnx" / "report.json").read_text())
    assert "attention fusion off: qwen2 is not an encoder" in report["fusion_notes"][0]
    assert_parity(bundle_dir, model)  # the default prompt
    assert_parity(bundle_dir, model, prompt_name="document")


def test_labse_style_cls_dense_tanh_normalize(tmp_path, params):
    model = make_st_model(tmp_path / "model", pooling=("cls",), dense=[(16, TANH, True)], normalize=True)
    bundle_dir = build_bundle(model, tmp_path / "b", fast_params(params), fp16=False)
    assert [m["type"] for m in json.loads((bundle_dir / "head.json").read_text())["modules"]] == \
        ["Pooling", "Dense", "Normalize"]
    assert_parity(bundle_dir, model)


def test_modernbert_long_context_8192(tmp_path, params):
    model = make_zoo_model(tmp_path / "model", "modernbert", max_seq_length=8192, max_position_embeddings=8192)
    bundle_dir = build_bundle(model, tmp_path / "b", fast_params(params), fp16=False)
    assert Bundle.load(bundle_dir, variant="fp32").head.max_seq_length == 8192
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 80)  # ~720 tokens, past 512
    assert_parity(bundle_dir, model, sentences=CORPUS[::4] + [long])
    # the default TensorRT profiles stop at 512 tokens: that is checked only where plans are built
    cfg = {**params["trt"], "timing_cache": str(tmp_path / "caches")}
    if build_trt.availability()[0] is None:
        records = build_trt.run(cfg, tmp_path / "none.onnx", tmp_path / "trt", 8192)
        assert all(r["skipped"] for r in records.values())


def test_build_trt_disabled_does_not_check_profiles(tmp_path, params):
    cfg = {**params["trt"], "enabled": False, "timing_cache": str(tmp_path / "caches")}
    records = build_trt.run(cfg, tmp_path / "model.onnx", tmp_path / "trt", 8192)
    assert records["h100"] == {"target": "h100", "compute_capability": "9.0", "skipped": True,
                               "reason": "trt.enabled is false", "plans": []}
    assert {r["reason"] for r in records.values()} == {"trt.enabled is false"}
    with pytest.raises(StageError, match="max_seq_length is 8192"):  # what a build would refuse
        build_trt.check_coverage(cfg["profiles"], 8192)


@pytest.mark.parametrize("family, max_pos, max_len, ok", [
    ("xlm-roberta", 66, 64, True),    # RoBERTa's padding_idx offset of 2: 64 positions usable
    ("xlm-roberta", 66, 65, False),
    ("bert", 128, 129, False),
])
def test_max_seq_length_beyond_the_position_table_is_refused(family, max_pos, max_len, ok, tmp_path):
    if family == "bert":  # the legacy explicit setting (a derived one is capped at the table, as ST does)
        model = make_st_model(tmp_path / "model")
        (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len}))
    else:
        model = make_zoo_model(tmp_path / "model", family, max_seq_length=max_len, max_position_embeddings=max_pos)
    (tmp_path / "out").mkdir()
    if ok:
        assert split.run(model, tmp_path / "out").max_seq_length == max_len
        return
    usable = max_pos - 2 if family == "xlm-roberta" else max_pos
    with pytest.raises(StageError, match=rf"max_seq_length {max_len} exceeds the {usable} positions"):
        split.run(model, tmp_path / "out")


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return make_st_model(tmp_path_factory.mktemp("plain") / "model", dense=[(16, TANH, True)])


@pytest.mark.parametrize("file, key, value", [
    ("sentence_bert_config.json", "processing_kwargs", {"text": {"max_length": 16}}),
    ("sentence_bert_config.json", "transformer_task", "text-generation"),
    ("sentence_bert_config.json", "module_output_name", "hidden_states"),
    ("sentence_bert_config.json", "query_length", 32),
    ("sentence_bert_config.json", "some_future_option", True),
    ("1_Pooling/config.json", "pooling_top_k", 3),
    ("2_Dense/config.json", "use_residual", True),
    ("2_Dense/config.json", "dropout", 0.1),
    ("3_Normalize/config.json", "module_output_name", "normalized"),
    ("3_Normalize/config.json", "p", 1),
])
def test_settings_split_does_not_implement_are_refused(file, key, value, plain_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(plain_model, model)
    path = model / file
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError) as err:
        split.run(model, tmp_path / "out")
    message = str(err.value)
    assert str(path) in message and key in message and "\n" not in message


def test_settings_at_their_defaults_are_accepted(plain_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(plain_model, model)
    path = model / "sentence_bert_config.json"
    cfg = {**json.loads(path.read_text()), "processing_kwargs": {}, "unpad_inputs": False, "query_length": None}
    path.write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    head = split.run(model, tmp_path / "out")
    assert head.prompts == {} and head.default_prompt_name is None  # only empty prompts: nothing carried


def test_bert_with_left_padding_is_refused(tmp_path):
    """BERT's positions count from the first (padded) slot: sentence-transformers' own embedding of a
    left-padded sentence changes with its batch, so no bundle could match it."""
    model = make_st_model(tmp_path / "model")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "padding_side": "left"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(StageError, match="padding_side 'left', but bert counts positions from the first padded"):
        split.run(model, tmp_path / "out")


def test_head_without_prompts_keeps_its_keys(tmp_path):
    """A model without prompts (all-MiniLM-L6-v2's config) writes head.json exactly as before."""
    model = make_st_model(tmp_path / "model")
    (model / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {}}))
    (tmp_path / "out").mkdir()
    split.run(model, tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "modules" / "head.json").read_text())
    assert sorted(spec) == ["do_lower_case", "hidden_size", "max_seq_length", "modules", "pad_token",
                            "pad_token_id", "padding_side", "schema", "truncation_side"]


def test_unknown_prompt_name_lists_the_prompts(e5):
    bundle = Bundle.load(e5[1], variant="fp32")
    with pytest.raises(ValueError, match=r"prompt_name 'doc' is not one of this model's prompts: \['document', "
                                         r"'passage', 'query'\]"):
        bundle.encode(["x"], prompt_name="doc")


def test_cli_prompt_flags(e5, tmp_path):
    from sbert_bundle.cli import main

    model, bundle_dir = e5
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES[:5]) + "\n")
    ref = st_model(model)
    for flags, kwargs in ((["--prompt-name", "query"], {"prompt_name": "query"}),
                          (["--prompt", "passage: "], {"prompt": "passage: "})):
        out = tmp_path / "out.npy"
        assert main(["encode", str(bundle_dir), "-i", str(tmp_path / "in.txt"), "-o", str(out),
                     "--variant", "fp32", *flags]) == 0
        assert min_cosine(np.load(out), ref.encode(SENTENCES[:5], **kwargs)) >= FP32_GATE
    assert main(["encode", str(bundle_dir), "-i", str(tmp_path / "in.txt"), "--prompt-name", "nope"]) == 1
