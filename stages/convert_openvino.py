"""Stage `convert_openvino`: the OpenVINO IR of the plain fp32 graph, for the ov-* CPU variants.

Reads artifacts/<model>/onnx/model.onnx, writes artifacts/<model>/openvino/:
  model.xml, model.bin    OpenVINO IR (ov.convert_model + ov.save_model, weights kept in fp32)
  report.json             the OpenVINO version and which parity checks passed, or why it was skipped

The bundle carries the IR rather than compiling the ONNX graph at load: measured on the default
model (2-core Xeon, 2026-12-08), reading the IR and compiling took 0.18 s against 0.36 s from ONNX
at the same speed afterwards, and the IR's bytes are fixed at build time (a conversion in a fresh
process gives the same bytes) instead of depending on the consumer's OpenVINO frontend.

The plain graph is converted, not model_fused.onnx: OpenVINO does its own fusions, and the
onnxruntime contrib ops of the fused graph are not what its ONNX frontend is best at. Both ran at
the same speed here.

Parity: the IR at f32 against onnxruntime on the same graph, and at bf16 where this CPU has
native bf16 (else recorded as not checked, and why), as sentence cosines through the bundle's
head on export's validation batches; the stage fails below a threshold. report.json holds the
thresholds, never the measured figures (they follow the CPU's instruction set, and which checks
run follows its bf16 support), so it is the same on every CPU; the figures are logged and written to
artifacts/measured/<model>/convert_openvino.json (docs/reproducibility.md).
Without openvino installed, or with openvino.enabled false, report.json says skipped and why,
and the bundle has no ov-* variant.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import numpy as np

from .common import (OUTPUT_THREADS, StageError, atomic_dir, cpu_session, load_model, row_cosines, stage_main,
                     write_json, write_measured)
from .export_onnx import validation_batches

log = logging.getLogger("stages.convert_openvino")
SOURCE = "model.onnx"
IR_FILES = ("model.xml", "model.bin")


def skipped_reason(cfg: dict) -> str | None:
    if not cfg["enabled"]:
        return "openvino.enabled is false"
    try:
        importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        return "openvino is not installed in the build environment (make install installs it from the lock)"
    return None


def convert(src: Path, out_dir: Path) -> None:
    """model.xml + model.bin in out_dir. The IR records the source file's name, not its folder."""
    import openvino as ov

    model = ov.convert_model(str(src))
    ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=False)


def reference_embeddings(src: Path, batches: list[dict], head) -> list[np.ndarray]:
    """onnxruntime on the source graph through the head: what each precision's IR is compared with."""
    session = cpu_session(src)
    names = [i.name for i in session.get_inputs()]
    return [head(session.run(None, {n: b[n] for n in names})[0], b["attention_mask"]) for b in batches]


def sentence_cosines(out_dir: Path, batches: list[dict], reference: list[np.ndarray], head,
                     precision: str) -> np.ndarray:
    """Per-sentence cosine of the IR at `precision` against the reference embeddings."""
    import openvino as ov

    from sbert_bundle.ov import openvino_message

    try:
        compiled = ov.Core().compile_model(str(out_dir / "model.xml"), "CPU", {
            "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": OUTPUT_THREADS})
    except RuntimeError as e:  # e.g. bf16 listed by the CPU plugin while ONEDNN_MAX_CPU_ISA caps oneDNN below it
        raise StageError(f"OpenVINO cannot compile {out_dir / 'model.xml'} at {precision} on this CPU: "
                         f"{openvino_message(e)}") from None
    request = compiled.create_infer_request()
    names = [port.get_any_name() for port in compiled.inputs]
    cos = []
    for batch, ref in zip(batches, reference):
        got = request.infer({n: batch[n] for n in names})[0]
        if not np.isfinite(got).all():
            raise StageError(f"the OpenVINO IR at {precision} produced inf/NaN on batch {batch['input_ids'].shape}")
        cos.append(row_cosines(ref, head(got.astype(np.float32), batch["attention_mask"])))
    return np.concatenate(cos)


def run(cfg: dict, onnx_dir: Path, split_dir: Path, out_dir: Path) -> dict:
    """Writes the IR and report.json to out_dir; returns the measured figures (the min cosine at each
    precision checked here; none when skipped)."""
    reason = skipped_reason(cfg)
    if reason:
        log.warning("OpenVINO variants skipped: %s", reason)
        write_json(out_dir / "report.json", {"skipped": True, "reason": reason, "openvino": None})
        return {}
    import openvino as ov
    from transformers import AutoTokenizer

    from sbert_bundle.head import load_head

    src = onnx_dir / SOURCE
    if not src.is_file():
        raise StageError(f"{src} not found: run export_onnx first")
    log.info("converting %s to OpenVINO IR", src)
    convert(src, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(split_dir / "transformer", trust_remote_code=False)
    head = load_head(split_dir / "modules")
    batches = validation_batches(tokenizer, head.max_seq_length, {"batch_sizes": [3], "lengths": [4, 40, 400]})
    reference = reference_embeddings(src, batches, head)
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    thresholds = {"f32": cfg["parity"]["f32_min_sentence_cosine"], "bf16": cfg["parity"]["bf16_min_sentence_cosine"]}
    measured = {}
    for precision, threshold in thresholds.items():
        if precision == "bf16" and "BF16" not in capabilities:
            log.info("OpenVINO IR at bf16: not checked, this CPU has no native bf16 (verify checks ov-bf16 where "
                     "it runs)")
            continue
        worst = float(sentence_cosines(out_dir, batches, reference, head, precision).min())
        log.info("OpenVINO IR at %s: min sentence cosine vs onnxruntime %.7f (threshold %s)", precision, worst,
                 threshold)
        measured.setdefault("min_sentence_cosine_vs_onnxruntime", {})[precision] = worst
        if worst < threshold:
            raise StageError(f"the OpenVINO IR at {precision}: min sentence cosine vs onnxruntime on {SOURCE} "
                             f"{worst:.6f} < {threshold} (openvino.parity.{precision}_min_sentence_cosine)")
    # the same on every CPU: which checks gate the stage, not what this CPU measured
    write_json(out_dir / "report.json", {"skipped": False, "reason": None, "openvino": ov.__version__.split("-")[0],
                                         "source": SOURCE, "files": list(IR_FILES), "min_sentence_cosine": thresholds})
    return measured


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        with atomic_dir(art / "openvino") as tmp:
            measured = run(params["openvino"], art / "onnx", art / "split", tmp)
        write_measured(art, "convert_openvino", measured)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
