"""The modules that follow the Transformer in a sentence-transformers model, in numpy.

This is the project's only implementation of Pooling / Dense / Normalize. The build side
(`stages.split`) writes a `head.json` describing them; the runtime reads it here. The
arithmetic mirrors sentence-transformers' own modules, for right- and left-padded batches,
including `include_prompt: false` (prompt tokens left out of pooling).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEAD_FILE = "head.json"
HEAD_SCHEMA = 1

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.GELU() computes it."""
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


ACTIVATIONS = {
    "identity": lambda x: x,
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "gelu": _gelu,
}


class HeadError(ValueError):
    """A head.json that cannot be used: names the file and the offending value."""


def _masked_sum(tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum over seq of tokens * weights, (batch, seq, dim) x (batch, seq) -> (batch, dim), as one
    batched matrix product (4x faster than multiply-then-sum, which materializes the product)."""
    return np.matmul(weights[:, None, :], tokens)[:, 0]


@dataclass(frozen=True)
class Pooling:
    embedding_dimension: int
    modes: tuple[str, ...] = ("mean",)
    include_prompt: bool = True

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in POOLING_MODES]
        if bad or not self.modes:
            raise HeadError(f"pooling modes {list(self.modes)} invalid; supported: {list(POOLING_MODES)}")

    @property
    def output_dimension(self) -> int:
        return len(self.modes) * self.embedding_dimension

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, prompt_length: int = 0) -> np.ndarray:
        """tokens: (batch, seq, dim) float32; mask: (batch, seq) 0/1 ints; prompt_length: how many
        leading tokens of every sentence are the prompt (sentence-transformers' prompt_length).

        With include_prompt false, the prompt tokens are masked out of every mode, as
        sentence-transformers does: positions before the first real token plus prompt_length are
        zeroed (weightedmean keeps the weights of the unmasked batch)."""
        mask = mask.astype(np.int64)
        batch, seq, dim = tokens.shape
        first_real = mask.argmax(axis=1)  # the left padding of each row (0 for right padding)
        if prompt_length and not self.include_prompt:
            mask = np.where(np.arange(seq)[None, :] < (first_real + prompt_length)[:, None], 0, mask)
        maskf = mask[:, :, None].astype(np.float32)
        out: list[np.ndarray] = []
        for mode in self.modes:
            if mode == "cls":
                first = mask.argmax(axis=1)
                out.append(tokens[np.arange(batch), first])
            elif mode == "max":
                out.append(np.where(maskf > 0, tokens, -np.inf).max(axis=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                summed = _masked_sum(tokens, maskf[:, :, 0])
                count = np.maximum(maskf.sum(axis=1), 1e-9)
                out.append(summed / (count if mode == "mean" else np.sqrt(count)))
            elif mode == "weightedmean":
                weights = np.arange(1, seq + 1, dtype=np.float32)[None, :, None]
                weights = weights - first_real.astype(np.float32)[:, None, None]
                weighted = maskf * weights
                out.append(_masked_sum(tokens, weighted[:, :, 0]) / np.maximum(weighted.sum(axis=1), 1e-9))
            elif mode == "lasttoken":
                flipped = mask[:, ::-1]
                idx = flipped.argmax(axis=1)
                idx = np.where(flipped.max(axis=1) == 0, seq - 1, idx)
                last = seq - idx - 1
                out.append(tokens[np.arange(batch), last] * maskf[np.arange(batch), last])
        return np.concatenate(out, axis=-1).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"type": "Pooling", "embedding_dimension": self.embedding_dimension,
                "modes": list(self.modes), "include_prompt": self.include_prompt}


@dataclass(frozen=True)
class Dense:
    in_features: int
    out_features: int
    activation: str
    weight: np.ndarray = field(repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    weight_file: str = ""
    bias_file: str | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise HeadError(f"Dense activation {self.activation!r} unsupported; supported: {sorted(ACTIVATIONS)}")
        if self.weight.shape != (self.out_features, self.in_features):
            raise HeadError(f"Dense weight {self.weight_file} has shape {self.weight.shape}, "
                            f"expected {(self.out_features, self.in_features)}")

    @property
    def output_dimension(self) -> int:
        return self.out_features

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        return ACTIVATIONS[self.activation](y).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"type": "Dense", "in_features": self.in_features, "out_features": self.out_features,
                "activation": self.activation, "weight": self.weight_file, "bias": self.bias_file}


@dataclass(frozen=True)
class Normalize:
    def __call__(self, x: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return (x / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {"type": "Normalize"}


@dataclass(frozen=True)
class Head:
    """Tokenization settings plus the module stack applied to the Transformer output."""

    max_seq_length: int
    do_lower_case: bool
    hidden_size: int
    pad_token: str
    pad_token_id: int
    padding_side: str = "right"
    truncation_side: str = "right"
    modules: tuple = ()
    prompts: dict = field(default_factory=dict)  # name -> text, from config_sentence_transformers.json
    default_prompt_name: str | None = None

    @property
    def embedding_dimension(self) -> int:
        dim = self.hidden_size
        for m in self.modules:
            dim = getattr(m, "output_dimension", dim)
        return dim

    def __call__(self, tokens: np.ndarray, mask: np.ndarray, prompt_length: int = 0) -> np.ndarray:
        x = tokens
        for m in self.modules:
            x = m(x, mask, prompt_length) if isinstance(m, Pooling) else m(x)
        return x

    @property
    def prompts_matter(self) -> bool:
        """Whether the prompt's token count is needed (some Pooling leaves the prompt out)."""
        return any(isinstance(m, Pooling) and not m.include_prompt for m in self.modules)

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str | None:
        """The prompt text to prepend, as sentence-transformers resolves it: an explicit prompt wins
        over prompt_name; with neither, the model's default_prompt_name (if any)."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt is {type(prompt).__name__}, expected str")
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name {prompt_name!r} is not one of this model's prompts: "
                                 f"{sorted(self.prompts) or 'it has none'}")
            return self.prompts[prompt_name]
        return self.prompts.get(self.default_prompt_name) if self.default_prompt_name is not None else None

    def to_dict(self) -> dict:
        return {"schema": HEAD_SCHEMA, "max_seq_length": self.max_seq_length,
                "do_lower_case": self.do_lower_case, "hidden_size": self.hidden_size,
                "pad_token": self.pad_token, "pad_token_id": self.pad_token_id,
                "padding_side": self.padding_side, "truncation_side": self.truncation_side,
                "modules": [m.to_dict() for m in self.modules],
                # only for a model with prompts: head.json of a model without stays as it was
                **({"prompts": self.prompts, "default_prompt_name": self.default_prompt_name}
                   if self.prompts or self.default_prompt_name is not None else {})}

    def save(self, folder: Path) -> Path:
        """Write head.json (Dense weights must already be saved at their relative paths)."""
        path = Path(folder) / HEAD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def load_head(folder: str | Path) -> Head:
    """head.json and the arrays it names; HeadError names the file and what is wrong with it."""
    folder = Path(folder)
    path = folder / HEAD_FILE
    try:
        spec = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise HeadError(f"{path} not found: not a bundle or split folder") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeadError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(spec, dict):
        raise HeadError(f"{path} holds a JSON {type(spec).__name__}, expected an object")
    if spec.get("schema") != HEAD_SCHEMA:
        raise HeadError(f"{path} has schema {spec.get('schema')!r}; this runtime reads schema {HEAD_SCHEMA}")
    ints = {k: spec.get(k) for k in ("max_seq_length", "hidden_size", "pad_token_id")}
    bad = [f"{k}={v!r}" for k, v in ints.items()
           if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= (1 << 24)]
    if bad or not isinstance(spec.get("modules"), list):
        raise HeadError(f"{path}: " + (f"expected integers in 0..{1 << 24}: {', '.join(bad)}" if bad
                                       else "modules: expected a list"))
    try:
        return _build_head(folder, path, spec)
    except HeadError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, OSError) as e:
        raise HeadError(f"{path} is malformed ({type(e).__name__}: {e})") from None


def _build_head(folder: Path, path: Path, spec: dict) -> Head:
    modules = []
    for i, m in enumerate(spec["modules"]):
        kind = m.get("type")
        if kind == "Pooling":
            modules.append(Pooling(m["embedding_dimension"], tuple(m["modes"]), m.get("include_prompt", True)))
        elif kind == "Dense":
            weight = np.load(folder / m["weight"], allow_pickle=False).astype(np.float32)
            bias = np.load(folder / m["bias"], allow_pickle=False).astype(np.float32) if m.get("bias") else None
            modules.append(Dense(m["in_features"], m["out_features"], m["activation"], weight, bias,
                                 m["weight"], m.get("bias")))
        elif kind == "Normalize":
            modules.append(Normalize())
        else:
            raise HeadError(f"{path} module {i} has type {kind!r}; supported: Pooling, Dense, Normalize")
    if spec.get("padding_side", "right") not in ("left", "right") or \
            spec.get("truncation_side", "right") not in ("left", "right"):
        raise HeadError(f"{path}: padding_side and truncation_side must be 'left' or 'right'")
    prompts, default = spec.get("prompts", {}), spec.get("default_prompt_name")
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise HeadError(f"{path}: prompts must be an object of strings")
    if default is not None and default not in prompts:
        raise HeadError(f"{path}: default_prompt_name {default!r} is not one of its prompts {sorted(prompts)}")
    return Head(spec["max_seq_length"], spec["do_lower_case"], spec["hidden_size"], spec["pad_token"],
                spec["pad_token_id"], spec.get("padding_side", "right"), spec.get("truncation_side", "right"),
                tuple(modules), prompts, default)
