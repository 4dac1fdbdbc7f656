"""sbert-bundle runtime: load a bundle built by the sbert-bundle pipeline and encode sentences.

Needs numpy, tokenizers and onnxruntime (TensorRT optional); never torch.

    from sbert_bundle import Bundle
    bundle = Bundle.load("artifacts/minilm_l6/bundle")          # best variant that runs here
    embeddings = bundle.encode(["a sentence", "another"])
"""

from .backends import BackendError
from .bundle import Bundle, NonFiniteError, VariantError
from .head import HeadError
from .manifest import IntegrityError
from .tokenization import TokenizerError

__all__ = ["Bundle", "VariantError", "IntegrityError", "HeadError", "BackendError", "NonFiniteError",
           "TokenizerError"]
