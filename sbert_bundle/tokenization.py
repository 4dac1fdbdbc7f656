"""Tokenization exactly as sentence-transformers' Transformer module does it.

sentence-transformers calls the Hugging Face tokenizer with padding to the longest item,
`truncation="longest_first"` and `max_length=max_seq_length`, and adds a Lowercase
normalizer in front when `do_lower_case` is set. The fast tokenizer is a `tokenizers`
pipeline, so the same `tokenizer.json` with the same settings gives the same ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, normalizers

from .head import Head

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """tokenizer.json cannot be loaded by the tokenizers library; names the file."""


class TextTokenizer:
    def __init__(self, tokenizer_json: Path, head: Head):
        try:
            self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{tokenizer_json} cannot be loaded by tokenizers ({first[:300]})") from None
        if head.do_lower_case:
            current = self.tokenizer.normalizer
            steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
            self.tokenizer.normalizer = normalizers.Sequence(steps)
        self.tokenizer.enable_truncation(max_length=head.max_seq_length, strategy="longest_first",
                                         direction=head.truncation_side)
        self.tokenizer.no_padding()  # padding is per batch, in pad()
        self.pad_id = head.pad_token_id
        self.left = head.padding_side == "left"
        self.special_ids = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}

    def encode(self, texts: list[str]) -> list:
        """Truncated, unpadded encodings (their lengths decide the batches)."""
        return self.tokenizer.encode_batch(texts)

    def pad(self, encodings: list) -> dict[str, np.ndarray]:
        """One batch as int64 arrays, padded to its longest item."""
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        types = np.zeros((len(encodings), width), dtype=np.int64)
        for row, e in enumerate(encodings):
            span = slice(width - len(e.ids), width) if self.left else slice(0, len(e.ids))
            ids[row, span] = e.ids
            mask[row, span] = e.attention_mask
            types[row, span] = e.type_ids
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}

    def prompt_length(self, prompt: str) -> int:
        """The prompt's length in tokens as sentence-transformers counts it: the prompt tokenized
        alone (special tokens, truncation included), less a trailing special token (EOS / SEP)."""
        ids = self.tokenizer.encode(prompt).ids
        return len(ids) - 1 if ids and ids[-1] in self.special_ids else len(ids)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.pad(self.encode(texts))


class Tokens:
    """Token ids given by a caller (the server's `input` as ids), shaped like a tokenizers Encoding
    for `TextTokenizer.pad`: used as the model's whole input, special tokens included."""

    __slots__ = ("ids", "attention_mask", "type_ids", "overflowing")

    def __init__(self, ids: list[int]):
        self.ids = ids
        self.attention_mask = [1] * len(ids)
        self.type_ids = [0] * len(ids)
        self.overflowing = ()
