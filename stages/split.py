"""Stage `split`: cut a sentence-transformers model at its Transformer by modules.json.

Reads artifacts/<model>/source/model/ and writes artifacts/<model>/split/:
  transformer/   the Hugging Face model + tokenizer (with tokenizer.json) to export
  modules/       files that go verbatim into the bundle root: head.json and the Dense
                 weights it points at (read by sbert_bundle), plus the sentence-transformers
                 configuration (modules.json, sentence_bert_config.json, 1_Pooling/…,
                 2_Dense/…) so that sentence-transformers can load the bundle as well.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from sbert_bundle.head import HEAD_FILE, Dense, Head, Normalize, Pooling

from .common import StageError, atomic_dir, load_model, read_json, stage_main, write_json

log = logging.getLogger("stages.split")

SUPPORTED = ("Transformer", "Pooling", "Dense", "Normalize")
# A Hugging Face tokenizer needs one of these (transformers 5 otherwise builds an empty default one).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
ST_CONFIG_FILES = ("sentence_bert_config.json", "config_sentence_transformers.json")
# sentence-transformers' legacy pooling flags, in the order it concatenates them.
LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# Dense options sentence-transformers 6 added; only their defaults are supported.
DENSE_DEFAULTS = {"use_residual": False, "module_input_name": "sentence_embedding",
                  "module_output_name": "sentence_embedding"}
# Every other key of a module's config changes the numbers in a way sbert_bundle does not implement:
# refused, naming the file and the key. (The Transformer's settings are checked in transformer_settings.)
POOLING_KEYS = {"embedding_dimension", "word_embedding_dimension", "pooling_mode", "include_prompt", *LEGACY_POOLING}
DENSE_KEYS = {"in_features", "out_features", "bias", "activation_function", *DENSE_DEFAULTS}
NORMALIZE_DEFAULTS = {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"}
# sentence_bert_config.json: read (max_seq_length, do_lower_case), free of numeric effect (unpad_inputs: the
# flash-attention layout), or supported only at sentence-transformers' default for text embedding.
TRANSFORMER_READ = {"max_seq_length", "do_lower_case", "unpad_inputs"}
TRANSFORMER_DEFAULTS = {
    "transformer_task": "feature-extraction",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
    "module_output_name": "token_embeddings",
    "processing_kwargs": {},
    "query_length": None,
    "document_length": None,
    "query_expansion": None,
}
# Architectures whose position ids start at padding_idx + 1 (create_position_ids_from_input_ids).
PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "data2vec-text",
                            "longformer", "luke", "markuplm", "roc_bert", "ernie")
# Architectures whose embedding of a sentence does not depend on left padding: positions counted from the
# first real token (the padding_idx offset above) or rotary (relative) positions. Others (BERT's absolute
# positions from 0) embed a left-padded sentence differently in every batch, sentence-transformers included.
LEFT_PADDING_SAFE = PADDING_OFFSET_POSITIONS + ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text",
                                                "phi3", "modernbert")
ACTIVATIONS = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.GELU": "gelu",
}


def read_modules(model_dir: Path) -> list[dict]:
    """modules.json entries, each with 'kind' (short type) and a checked 'dir'."""
    path = model_dir / "modules.json"
    entries = read_json(path, "modules.json")
    if not isinstance(entries, list) or not entries:
        raise StageError(f"{path} must be a non-empty JSON list of modules")
    root = model_dir.resolve()
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "type" not in entry or "path" not in entry:
            raise StageError(f"{path} entry {i} lacks 'type' or 'path': {entry!r}")
        kind = entry["type"].rsplit(".", 1)[-1]
        if not entry["type"].startswith("sentence_transformers.") or kind not in SUPPORTED:
            raise StageError(f"{path} entry {i} has type {entry['type']!r}; supported: {', '.join(SUPPORTED)}")
        folder = (model_dir / entry["path"]).resolve()
        if folder != root and root not in folder.parents:
            raise StageError(f"{path} entry {i} path {entry['path']!r} leaves the model folder {model_dir}")
        out.append({**entry, "kind": kind, "dir": folder})
    kinds = [e["kind"] for e in out]
    if kinds[:2] != ["Transformer", "Pooling"] or "Transformer" in kinds[2:] or "Pooling" in kinds[2:]:
        raise StageError(f"{path}: expected Transformer, then Pooling, then any Dense / Normalize; got {kinds}")
    return out


# Files whose "auto_map" would make transformers import Python code shipped in the model folder.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(folder: Path) -> None:
    """A model folder is input from a stranger: no file in it may ask transformers to run its code."""
    for name in CODE_MAP_FILES:
        path = folder / name
        if path.is_file():
            cfg = read_json(path, name)
            if isinstance(cfg, dict) and cfg.get("auto_map"):
                raise StageError(f"{path} has an auto_map ({', '.join(map(str, cfg['auto_map']))}): it asks to run "
                                 "Python code from the model folder, which sbert-bundle never does")


def load_pickled_weights(path: Path) -> dict:
    """pytorch_model.bin as plain tensors only (torch's weights_only unpickler: no code runs)."""
    import pickle

    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StageError(f"{path} is a pickle checkpoint that does not load as plain tensors ({first}); "
                         "give the model as model.safetensors") from None


# Keys transformers' save_pretrained copies from how the tokenizer was loaded (HF_HUB_OFFLINE gives
# local_files_only: true), not from the tokenizer: they would make the bytes follow the environment.
LOADER_STATE = ("local_files_only", "is_local", "cache_dir", "token", "use_auth_token", "revision",
                "trust_remote_code", "_commit_hash", "subfolder")


def drop_loader_state(path: Path) -> None:
    """Rewrite tokenizer_config.json without LOADER_STATE keys, in one fixed JSON form."""
    if not path.is_file():
        return
    cfg = read_json(path, "tokenizer_config.json")
    for key in LOADER_STATE:
        cfg.pop(key, None)
    write_json(path, cfg)


def split_transformer(folder: Path, dest: Path) -> dict:
    """Copy the Transformer module, normalise its tokenizer, return tokenization settings."""
    from transformers import AutoConfig, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise StageError(f"{folder / 'config.json'} missing: the Transformer module needs its model config")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise StageError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
    if not any((folder / t).is_file() for t in TOKENIZER_FILES):
        raise StageError(f"tokenizer files missing in {folder}: expected one of {', '.join(TOKENIZER_FILES)}")
    refuse_remote_code(folder)
    if not (folder / "model.safetensors").is_file() and (folder / "pytorch_model.bin").is_file():
        load_pickled_weights(folder / "pytorch_model.bin")  # refuse here, in one line, what export would choke on
    dest.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != "modules.json":
            shutil.copy2(f, dest / f.name)
    try:
        config = AutoConfig.from_pretrained(dest, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise StageError(f"{folder / 'config.json'} cannot be read by transformers: {e}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(dest, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"tokenizer files missing or unreadable in {folder} (expected tokenizer.json, or "
                         f"tokenizer_config.json with vocab.txt / sentencepiece files): {e}") from None
    tokenizer.save_pretrained(dest)
    drop_loader_state(dest / "tokenizer_config.json")
    if not (dest / "tokenizer.json").is_file():
        raise StageError(f"the tokenizer in {folder} has no fast (tokenizers) version; sbert_bundle needs one")
    st_cfg = transformer_settings(folder / "sentence_bert_config.json")
    max_len = st_cfg.get("max_seq_length")
    if max_len is None:  # sentence-transformers caps the tokenizer's length at the position table
        max_len = tokenizer.model_max_length
        if getattr(config, "max_position_embeddings", -1) not in (None, -1):
            max_len = min(max_len, config.max_position_embeddings)
    usable = position_table(config)
    if usable is not None and max_len > usable:
        raise StageError(f"{folder}: max_seq_length {max_len} exceeds the {usable} positions {config.model_type}'s "
                         f"position table holds (max_position_embeddings {config.max_position_embeddings}"
                         + (f" less the padding_idx offset {config.max_position_embeddings - usable}"
                            if usable != config.max_position_embeddings else "") + "): set a max_seq_length "
                         f"of at most {usable} in sentence_bert_config.json")
    if tokenizer.pad_token is None:
        raise StageError(f"the tokenizer in {folder} has no pad token; batching needs one")
    if tokenizer.padding_side == "left" and config.model_type not in LEFT_PADDING_SAFE:
        raise StageError(f"{folder / 'tokenizer_config.json'} sets padding_side 'left', but {config.model_type} "
                         "counts positions from the first padded slot: a sentence's embedding would depend on the "
                         "other sentences in its batch (in sentence-transformers too); pad on the right")
    return {
        "max_seq_length": int(max_len),
        "do_lower_case": bool(st_cfg.get("do_lower_case", False)),
        "hidden_size": int(config.hidden_size),
        "pad_token": tokenizer.pad_token,
        "pad_token_id": int(tokenizer.pad_token_id),
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
    }


def transformer_settings(path: Path) -> dict:
    """sentence_bert_config.json, refused when it sets anything sbert_bundle does not implement."""
    cfg = read_json(path, "sentence_bert_config.json") if path.is_file() else {}
    if not isinstance(cfg, dict):
        raise StageError(f"{path} holds a JSON {type(cfg).__name__}, expected an object")
    for key, value in cfg.items():
        if key in TRANSFORMER_READ:
            continue
        if key not in TRANSFORMER_DEFAULTS:
            raise StageError(f"{path} sets {key!r}, which sbert_bundle does not implement; it reads "
                             f"{sorted(TRANSFORMER_READ)} and {sorted(TRANSFORMER_DEFAULTS)} at their defaults")
        if value != TRANSFORMER_DEFAULTS[key] and not (key == "processing_kwargs" and value is None):
            raise StageError(f"{path} sets {key} to {value!r}; sbert_bundle supports only "
                             f"{TRANSFORMER_DEFAULTS[key]!r} (text embedding through the model's forward)")
    max_len = cfg.get("max_seq_length")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise StageError(f"{path} max_seq_length {max_len!r}: expected a positive integer")
    return cfg


def position_table(config) -> int | None:
    """How many tokens the model's position embeddings hold (None: no table to overrun)."""
    size = getattr(config, "max_position_embeddings", None)
    if not isinstance(size, int) or size <= 0:
        return None
    if config.model_type in PADDING_OFFSET_POSITIONS and getattr(config, "pad_token_id", None) is not None:
        return size - (config.pad_token_id + 1)  # positions run from padding_idx + 1
    return size


def refuse_unknown_keys(path: Path, cfg: dict, known: set[str], module: str) -> None:
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise StageError(f"{path} sets {', '.join(map(repr, unknown))}, which sbert_bundle's {module} does not "
                         f"implement; it reads {sorted(known)}")


def pooling_from(folder: Path, index: int) -> Pooling:
    cfg = read_json(folder / "config.json", f"Pooling config (modules.json entry {index})")
    refuse_unknown_keys(folder / "config.json", cfg, POOLING_KEYS, "Pooling")
    dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if "pooling_mode" in cfg:
        modes = cfg["pooling_mode"]
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
    else:
        modes = tuple(mode for key, mode in LEGACY_POOLING.items() if cfg.get(key)) or ("mean",)
    try:
        return Pooling(int(dim), modes, bool(cfg.get("include_prompt", True)))
    except ValueError as e:
        raise StageError(f"{folder / 'config.json'}: {e}") from None


def dense_from(folder: Path, index: int, dest: Path) -> Dense:
    cfg = read_json(folder / "config.json", f"Dense config (modules.json entry {index})")
    refuse_unknown_keys(folder / "config.json", cfg, DENSE_KEYS, "Dense")
    unsupported = {k: cfg[k] for k, default in DENSE_DEFAULTS.items() if k in cfg and cfg[k] != default}
    if unsupported:
        raise StageError(f"{folder / 'config.json'} sets {unsupported}; sbert_bundle supports Dense only with "
                         f"{DENSE_DEFAULTS}")
    act_name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act_name not in ACTIVATIONS:
        raise StageError(f"{folder / 'config.json'} activation_function {act_name!r} unsupported; "
                         f"supported: {', '.join(ACTIVATIONS)}")
    if (folder / "model.safetensors").is_file():
        from safetensors.numpy import load_file

        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = {k: v.numpy() for k, v in load_pickled_weights(folder / "pytorch_model.bin").items()}
    else:
        raise StageError(f"no weights in Dense folder {folder}: expected model.safetensors or pytorch_model.bin")
    if "linear.weight" not in state:
        raise StageError(f"Dense weights in {folder} lack 'linear.weight' (have {sorted(state)})")
    rel = f"head/{folder.name}"
    (dest / rel).mkdir(parents=True)
    np.save(dest / rel / "weight.npy", state["linear.weight"].astype(np.float32))
    bias_file = None
    if cfg.get("bias", True) and "linear.bias" in state:
        bias_file = f"{rel}/bias.npy"
        np.save(dest / bias_file, state["linear.bias"].astype(np.float32))
    try:
        return Dense(int(cfg["in_features"]), int(cfg["out_features"]), ACTIVATIONS[act_name],
                     state["linear.weight"].astype(np.float32),
                     None if bias_file is None else state["linear.bias"].astype(np.float32),
                     f"{rel}/weight.npy", bias_file)
    except ValueError as e:
        raise StageError(f"Dense module {folder}: {e}") from None


def normalize_from(folder: Path, index: int) -> Normalize:
    """Normalize's config (sentence-transformers 6: input / output feature names) at its defaults only."""
    path = folder / "config.json"
    cfg = read_json(path, f"Normalize config (modules.json entry {index})") if path.is_file() else {}
    refuse_unknown_keys(path, cfg, set(NORMALIZE_DEFAULTS), "Normalize")
    unsupported = {k: v for k, v in cfg.items() if v != NORMALIZE_DEFAULTS[k]}
    if unsupported:
        raise StageError(f"{path} sets {unsupported}; sbert_bundle supports Normalize only with {NORMALIZE_DEFAULTS}")
    return Normalize()


def st_pooling_config(pooling: Pooling) -> dict:
    """Pooling config in the legacy form that sentence-transformers 5 and 6 both read,
    unless the modes' order differs from the legacy concatenation order."""
    legacy_order = tuple(LEGACY_POOLING.values())
    if list(pooling.modes) != sorted(pooling.modes, key=legacy_order.index):
        return {"embedding_dimension": pooling.embedding_dimension, "pooling_mode": list(pooling.modes),
                "include_prompt": pooling.include_prompt}
    return {"word_embedding_dimension": pooling.embedding_dimension,
            **{key: mode in pooling.modes for key, mode in LEGACY_POOLING.items()},
            "include_prompt": pooling.include_prompt}


def prompts_from(model_dir: Path) -> dict:
    """The model's prompts and default_prompt_name (config_sentence_transformers.json), for the head."""
    path = model_dir / "config_sentence_transformers.json"
    cfg = read_json(path, "config_sentence_transformers.json") if path.is_file() else {}
    prompts, default = cfg.get("prompts") or {}, cfg.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise StageError(f"{path} prompts: expected an object of strings, got {prompts!r:.200}")
    if default is not None and default not in prompts:
        raise StageError(f"{path} default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    if not any(prompts.values()) and default is None:
        return {}  # nothing to carry: head.json stays as for a model without prompts
    return {"prompts": prompts, "default_prompt_name": default}


def run(model_dir: Path, out_dir: Path) -> Head:
    entries = read_modules(model_dir)
    prompts = prompts_from(model_dir)
    settings = split_transformer(entries[0]["dir"], out_dir / "transformer")
    modules_dir = out_dir / "modules"
    modules_dir.mkdir()
    head_modules = []
    st_modules = [{"idx": 0, "name": entries[0].get("name", "0"), "path": "",
                   "type": entries[0]["type"]}]
    for i, e in enumerate(entries[1:], start=1):
        if e["kind"] == "Pooling":
            head_modules.append(pooling_from(e["dir"], i))
        elif e["kind"] == "Dense":
            head_modules.append(dense_from(e["dir"], i, modules_dir))
        else:
            head_modules.append(normalize_from(e["dir"], i))
        # the sentence-transformers copy of this module, for loading the bundle with it
        rel = Path(e["path"]).as_posix()
        if e["dir"].is_dir():
            shutil.copytree(e["dir"], modules_dir / rel, dirs_exist_ok=True)
        if e["kind"] == "Pooling":
            write_json(modules_dir / rel / "config.json", st_pooling_config(head_modules[-1]))
        # the type path that sentence-transformers 5 and 6 both import
        st_modules.append({"idx": i, "name": e.get("name", str(i)), "path": rel,
                           "type": f"sentence_transformers.models.{e['kind']}"})
    st_modules[0]["type"] = "sentence_transformers.models.Transformer"
    write_json(modules_dir / "modules.json", st_modules)
    for name in ST_CONFIG_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, modules_dir / name)
    head = Head(modules=tuple(head_modules), **settings, **prompts)
    # tokenization settings in the form every sentence-transformers version reads
    write_json(modules_dir / "sentence_bert_config.json",
               {"max_seq_length": head.max_seq_length, "do_lower_case": head.do_lower_case})
    pooled = [m for m in head_modules if isinstance(m, Pooling)]
    if pooled and pooled[0].embedding_dimension != head.hidden_size:
        raise StageError(f"Pooling embedding_dimension {pooled[0].embedding_dimension} differs from the "
                         f"Transformer hidden_size {head.hidden_size}")
    head.save(modules_dir)
    return head


def main() -> None:
    def body(args):
        _, _, art = load_model(args)
        with atomic_dir(art / "split") as tmp:
            head = run(art / "source" / "model", tmp)
        log.info("split: transformer + %s (dim %d, max_seq_length %d)",
                 [type(m).__name__ for m in head.modules], head.embedding_dimension, head.max_seq_length)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
