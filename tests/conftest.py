"""Shared fixtures: tiny random sentence-transformers models and a pipeline runner.

`make_st_model(path, ...)` saves a few-layer random BERT (or DistilBERT, which takes no
token_type_ids) with a chosen Pooling / Dense / Normalize stack, using sentence-transformers'
own save, so the folders look exactly like real ones. `build_bundle(model_dir, root)` runs
the real stage functions (fetch → split → export_onnx → convert_fp16 → package) into root.
"""

from __future__ import annotations

import copy
import importlib
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a an and or of to in on for with is are was be this that it cat dog sat mat park ball "
         "quick brown fox jumps over lazy model sentence embedding vector search query document code "
         "python data fast slow red green blue one two three hello world test example long short").split()

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a cat sat on the mat",
    "hello world",
    "",
    "   ",
    "The Dog Is In The Park With A Ball",
    "python code is fast and the model is slow " * 12,
    "embedding vector search for a query document",
    "zz unknown wordz ☃ 😀 中文",
    "one",
    "two three",
    "green and blue and red",
]


def write_vocab(path: Path) -> Path:
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + chars + [f"##{c}" for c in chars]
    path.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    return path


def make_st_model(path: Path, *, arch: str = "bert", pooling=("mean",), dense=None, normalize: bool = True,
                  max_seq_length: int = 64, do_lower_case: bool = False, include_prompt: bool = True,
                  hidden: int = 32, seed: int = 0) -> Path:
    """Save a random tiny sentence-transformers model to path; returns path.

    dense: None, or a list of (out_features, activation module name, bias) tuples, e.g.
    [(16, "torch.nn.modules.activation.Tanh", True)].
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import (BertConfig, BertModel, BertTokenizerFast, DistilBertConfig, DistilBertModel,
                              MPNetConfig, MPNetModel)

    torch.manual_seed(seed)
    path = Path(path)
    hf_dir = path.parent / f"{path.name}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(hf_dir / "vocab.txt")
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=False)
    if arch == "distilbert":
        tok.model_input_names = ["input_ids", "attention_mask"]
        cfg = DistilBertConfig(vocab_size=tok.vocab_size, dim=hidden, n_layers=2, n_heads=4, hidden_dim=2 * hidden,
                               max_position_embeddings=128)
        model = DistilBertModel(cfg)
    elif arch == "mpnet":  # relative position buckets (a Cast to float in the graph), no token_type_ids
        tok.model_input_names = ["input_ids", "attention_mask"]
        cfg = MPNetConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=2 * hidden, max_position_embeddings=130, pad_token_id=tok.pad_token_id)
        model = MPNetModel(cfg)
    else:
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=128)
        model = BertModel(cfg)
    assert len(tok) > 100, "the tiny tokenizer must use the written vocabulary"
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length, do_lower_case=do_lower_case)
    modules = [transformer, models.Pooling(hidden, pooling_mode=tuple(pooling), include_prompt=include_prompt)]
    dim = hidden * len(pooling)
    for out_features, activation, bias in dense or []:
        from sentence_transformers.util import import_from_string

        act = import_from_string(activation)()
        layer = models.Dense(dim, out_features, bias=bias, activation_function=act)
        modules.append(layer)
        dim = out_features
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


@pytest.fixture(scope="session")
def raw_params() -> dict:
    """The committed params.yaml (itself the composition of conf/): `model` maps each model to build."""
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(scope="session")
def params(raw_params) -> dict:
    """The params of the default (first) model, shaped as one build reads them (stages.common.model_params)."""
    from stages.common import model_keys, model_params

    return model_params(raw_params, model_keys(raw_params)[0])


def as_params_file(p: dict, key: str = "tiny") -> dict:
    """One model's params (the `params` fixture's shape) as params.yaml holds them: `model` maps key to it."""
    return {**p, "model": {key: {**p["model"], "overrides": {}}}}


def fast_params(params: dict) -> dict:
    """Default params with smaller validation / speed settings for tiny models."""
    p = copy.deepcopy(params)
    p["export"]["validation"] = {"batch_sizes": [1, 3], "lengths": [4, 40, 100]}
    p["verify"]["speed"] = {"batch_sizes": [1, 4], "seq_lengths": [8], "warmup": 1, "repeats": 3,
                            "throughput_rounds": 1}
    p["verify"]["batch_size"] = 4
    return p


def build_bundle(model_dir: Path, root: Path, params: dict, *, fp16: bool = True, int8: bool = False,
                 openvino: bool = False) -> Path:
    """Run the real stages on model_dir; artifacts under root/artifacts. Returns the bundle folder."""
    return build_bundle_stages({"kind": "local", "path": str(model_dir)}, root, params, fp16=fp16, int8=int8,
                               openvino=openvino)


def build_bundle_stages(source: dict, root: Path, params: dict, *, fp16: bool = True, int8: bool = False,
                        openvino: bool = False) -> Path:
    """fetch (from `source`) -> split -> export_onnx -> [convert_fp16] -> [quantize] -> [convert_openvino]
    -> package."""
    from stages import convert_fp16, export_onnx, fetch, package, split

    art = root / "artifacts"
    for d in ("source", "split", "onnx", "fp16", "bundle"):
        (art / d).mkdir(parents=True, exist_ok=True)
    fetch.run(source, params["fetch"]["exclude"], art / "source")
    split.run(art / "source" / "model", art / "split")
    export_onnx.run(params["export"], art / "split", art / "onnx")
    wanted = ["fp32", "fp32-fused"]
    if fp16:
        convert_fp16.run(params["fp16"], art / "onnx", art / "split", art / "fp16")
        wanted += ["fp16", "fp16-fused"]
    if int8:
        from stages import quantize

        (art / "int8").mkdir(exist_ok=True)
        quantize.run(params["quantize"], art / "onnx", art / "split", art / "int8")
        wanted.append("int8")
    if openvino:
        from stages import convert_openvino

        (art / "openvino").mkdir(exist_ok=True)
        convert_openvino.run(params["openvino"], art / "onnx", art / "split", art / "openvino")
        wanted += ["ov-fp32", "ov-bf16"]
    p = copy.deepcopy(params)
    p["package"]["variants"] = wanted
    p["model"]["embedding_dimension"] = None  # params.yaml's is the default model's, not this tiny one's
    package.run(p, art, art / "bundle")
    return art / "bundle"


def st_encode(model_dir: Path, sentences: list[str], batch_size: int = 4):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device="cpu").encode(sentences, batch_size=batch_size,
                                                                   convert_to_numpy=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Mean pooling + Normalize, the default model's shape, at toy size."""
    return make_st_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model, params) -> Path:
    return build_bundle(tiny_model, tmp_path_factory.mktemp("tiny-build"), fast_params(params))



# --- model zoo: the other tokenizer families and architectures (tests/test_model_zoo.py) ---------------

CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?'-")


def unigram_tokenizer():
    """A SentencePiece-style Unigram tokenizer (XLM-R's layout: <s>=0 <pad>=1 </s>=2 <unk>=3, Metaspace,
    `<s> $A </s>`), built with the tokenizers library, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = [(s, 0.0) for s in specials] + [("▁" + w, -2.0 - len(w) / 10) for w in WORDS] + \
        [("▁", -4.0)] + [(c, -6.0) for c in CHARS] + [("▁" + c, -5.0) for c in CHARS] + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(list(dict(pieces).items()), unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                   model_input_names=["input_ids", "attention_mask"])
    return fast


def bpe_tokenizer(padding_side: str = "left"):
    """A byte-level BPE tokenizer (GPT-2 / Qwen layout) trained on the test words, appending
    <|endoftext|> to every input (as decoder embedders do for last-token pooling)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS), *SENTENCES, *WORDS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])


def make_zoo_model(path: Path, family: str, *, pooling=("mean",), dense=None, normalize: bool = True,
                   max_seq_length: int = 64, include_prompt: bool = True, prompts: dict | None = None,
                   default_prompt_name: str | None = None, hidden: int = 32, max_position_embeddings: int = 130,
                   padding_side: str = "left", seed: int = 0) -> Path:
    """A tiny random model of another family, saved by sentence-transformers.

    family: "xlm-roberta" (Unigram tokenizer, no token_type_ids, position ids offset by padding_idx + 1),
    "qwen2" (decoder, byte-level BPE, `padding_side`), "modernbert" (WordPiece, rotary, local+global
    attention). dense as in make_st_model."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(seed)
    path = Path(path)
    hf_dir = path.parent / f"{path.name}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    if family == "xlm-roberta":
        from transformers import XLMRobertaConfig, XLMRobertaModel

        tok = unigram_tokenizer()
        cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=2 * hidden, max_position_embeddings=max_position_embeddings,
                               type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
        model = XLMRobertaModel(cfg)
    elif family == "qwen2":
        from transformers import Qwen2Config, Qwen2Model

        tok = bpe_tokenizer(padding_side)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=False)
        model = Qwen2Model(cfg)
    elif family == "modernbert":
        from transformers import BertTokenizerFast, ModernBertConfig, ModernBertModel

        tok = BertTokenizerFast(vocab=str(write_vocab(hf_dir / "vocab.txt")), do_lower_case=False)
        tok.model_input_names = ["input_ids", "attention_mask"]
        cfg = ModernBertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=3, num_attention_heads=4, global_attn_every_n_layers=2,
                               local_attention=16, max_position_embeddings=max_position_embeddings,
                               pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
                               sep_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
                               eos_token_id=tok.sep_token_id)
        model = ModernBertModel(cfg)
    else:
        raise ValueError(f"unknown family {family!r}")
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    transformer = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules = [transformer, models.Pooling(hidden, pooling_mode=tuple(pooling), include_prompt=include_prompt)]
    dim = hidden * len(pooling)
    for out_features, activation, bias in dense or []:
        from sentence_transformers.util import import_from_string

        modules.append(models.Dense(dim, out_features, bias=bias, activation_function=import_from_string(activation)()))
        dim = out_features
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu", prompts=prompts,
                        default_prompt_name=default_prompt_name).save(str(path))
    return path


def first_module(*names):
    """The first of the named modules that imports, or None (TensorRT: full builder or lean runtime)."""
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


TRT = first_module("tensorrt", "tensorrt_lean")
needs_trt = pytest.mark.skipif(TRT is None, reason="neither tensorrt nor tensorrt_lean is installed "
                               "(pip install tensorrt-lean-cu13 gives the lean runtime from PyPI)")
