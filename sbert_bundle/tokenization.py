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


class TextTokenizer:
    def __init__(self, tokenizer_json: Path, head: Head):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        if head.do_lower_case:
            current = self.tokenizer.normalizer
            steps = [normalizers.Lowercase()] + ([current] if current is not None else [])
            self.tokenizer.normalizer = normalizers.Sequence(steps)
        self.tokenizer.enable_truncation(max_length=head.max_seq_length, strategy="longest_first")
        self.tokenizer.enable_padding(pad_id=head.pad_token_id, pad_token=head.pad_token,
                                      direction=head.padding_side)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
