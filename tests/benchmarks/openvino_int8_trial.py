"""Why the bundle has no ov-int8 variant yet: NNCF's post-training quantization of the bundle's IR,
tried with three settings, and its parity against the fp32 graph on the evaluation corpus.

    .venv-peers/bin/python tests/benchmarks/openvino_int8_trial.py [--bundle B]

Needs nncf (the peers venv has it: make peers-venv). Calibrates on the
calibration corpus (stages/data/calibration.jsonl, what quantize uses), one sentence per sample,
with model_type TRANSFORMER; prints min / mean cosine against onnxruntime fp32 and the worst
sentence for: SmoothQuant off, NNCF's defaults (SmoothQuant on, preset MIXED), preset PERFORMANCE.
issue 22 wants ov-int8 only where it beats onnxruntime's int8 at min cosine >= 0.995.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "minilm_l6" / "bundle")
    args = parser.parse_args()

    import nncf
    import numpy as np
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from sbert_bundle import Bundle
    from sbert_bundle.ov import OvBackend

    exact = Bundle.load(args.bundle, variant="fp32")
    read = lambda path: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    calibration = read(REPO / "stages" / "data" / "calibration.jsonl")
    sentences = read(REPO / "stages" / "data" / "eval_corpus.jsonl")
    reference = exact.encode(sentences)
    samples = [exact.tokenizer.pad([e]) for e in exact.tokenize(calibration)[0]]
    dataset = nncf.Dataset(samples, lambda x: {k: x[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    model = ov.Core().read_model(str(args.bundle / "openvino" / "model.xml"))
    trials = {"SmoothQuant off": {"advanced_parameters": AdvancedQuantizationParameters(
                  smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))},
              "NNCF defaults": {},
              "preset PERFORMANCE": {"preset": nncf.QuantizationPreset.PERFORMANCE}}
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, settings) in enumerate(trials.items()):
            quantized = nncf.quantize(model.clone(), dataset, model_type=nncf.ModelType.TRANSFORMER,
                                      subset_size=len(samples), **settings)
            xml = Path(tmp) / f"int8_{n}.xml"
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
            bundle = Bundle.load(args.bundle, variant="ov-fp32")
            bundle.backend = OvBackend(xml, xml.with_suffix(".bin"), "f32")
            cos = (bundle.encode(sentences) * reference).sum(1)
            print(f"{label:<20} min cos {cos.min():.6f}  mean cos {cos.mean():.6f}  worst: "
                  f"{sentences[int(np.argmin(cos))][:50]!r}")


if __name__ == "__main__":
    main()
