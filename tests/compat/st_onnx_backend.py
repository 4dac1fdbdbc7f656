"""Run inside a venv with sentence-transformers[onnx] (5.x): load a bundle with
sentence-transformers' own ONNX backend and compare with the PyTorch model.

    python st_onnx_backend.py BUNDLE REFERENCE.npy SENTENCES.jsonl MIN_COSINE

REFERENCE.npy holds the source model's embeddings, computed where that model loads.
"""

import json
import sys

import numpy as np
from sentence_transformers import SentenceTransformer

bundle, reference, corpus, min_cos = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
sentences = [json.loads(line) for line in open(corpus, encoding="utf-8")]
onnx = SentenceTransformer(bundle, backend="onnx", device="cpu", model_kwargs={"file_name": "onnx/model.onnx"})
emb = onnx.encode(sentences)
ref = np.load(reference)
cos = (emb * ref).sum(1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
print(json.dumps({"min_cosine": float(cos.min()), "n": len(sentences)}))
sys.exit(0 if cos.min() >= min_cos else 1)
