"""Stage `convert_fp16`: FP16 copies of the plain and fused graphs (onnxconverter-common).

Reads artifacts/<model>/onnx/, writes artifacts/<model>/fp16/:
  model_fp16.onnx, model_fp16_fused.onnx   inputs/outputs keep their types (keep_io_types)
  report.json                              the parity gate passed against fp32, or why it could not run
                                           here; the measured cosines go to artifacts/measured/<model>/
                                           convert_fp16.json (they follow the CPU)
Op types or node names that overflow in fp16 can be kept in fp32 through conf/fp16/.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from .common import (StageError, atomic_dir, cpu_session, load_model, row_cosines, stage_main, write_json,
                     write_measured)
from .export_onnx import validation_batches

log = logging.getLogger("stages.convert_fp16")
PAIRS = {"fp16": ("model.onnx", "model_fp16.onnx"), "fp16-fused": ("model_fused.onnx", "model_fp16_fused.onnx")}


def casts_to_float(model) -> list[str]:
    """Cast nodes with to=FLOAT: onnxconverter-common retypes their outputs to fp16 but keeps
    to=FLOAT, which makes an invalid graph (MPNet's relative-position buckets do this)."""
    import onnx

    return [n.name for n in model.graph.node if n.op_type == "Cast"
            and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]


def convert(src: Path, dest: Path, cfg: dict) -> list[str]:
    """Convert; returns the node names kept in fp32 on top of the op-type block list."""
    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(src))
    kept = list(cfg["node_block_list"]) + (casts_to_float(model) if cfg["keep_casts_to_float"] else [])
    with warnings.catch_warnings(record=True) as caught:  # one warning per clipped constant
        warnings.simplefilter("always")
        model16 = float16.convert_float_to_float16(
            model, keep_io_types=cfg["keep_io_types"], op_block_list=cfg["op_block_list"],
            node_block_list=kept or None)
    if caught:
        log.info("%s: %d fp32 constants clipped to the fp16 range (e.g. %s)", dest.name, len(caught),
                 str(caught[0].message))
    onnx.save(model16, str(dest))
    return kept


def parity(fp32: Path, fp16: Path, batches: list[dict], head, min_cos: float, name: str) -> tuple[dict, dict]:
    """Sentence embeddings (through the bundle's head) of fp16 vs fp32 on CPU; the gate is on
    those, as in verify. A valid graph the CPU provider cannot run is recorded, not failed.
    Returns (what report.json records: checked and the gate, the figures measured)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as MissingKernel

    try:
        s16 = cpu_session(fp16)
    except MissingKernel as e:  # a valid graph this build's CPU provider has no fp16 kernel for
        return {"checked": False, "reason": f"onnxruntime CPU cannot run {fp16.name}: {str(e).splitlines()[0]}"}, {}
    except Exception as e:  # noqa: BLE001 - anything else: the converted graph is broken
        raise StageError(f"{name}: the converted graph {fp16.name} is invalid: {str(e).splitlines()[0]}; keep the "
                         "offending nodes in fp32 via fp16.node_block_list / op_block_list") from None
    s32 = cpu_session(fp32)
    names = [i.name for i in s32.get_inputs()]
    token_cos, sentence_cos, max_diff = [], [], 0.0
    for b in batches:
        feed = {n: b[n] for n in names}
        out32, out16 = s32.run(None, feed)[0], s16.run(None, feed)[0].astype(np.float32)
        if not np.isfinite(out16).all():
            raise StageError(f"{name}: {fp16.name} produced inf/NaN on batch {b['input_ids'].shape} (fp16 "
                             "overflow): keep the overflowing ops in fp32 via fp16.op_block_list / node_block_list")
        valid = b["attention_mask"].astype(bool)
        token_cos.append(row_cosines(out32[valid], out16[valid]))
        sentence_cos.append(row_cosines(head(out32, b["attention_mask"]), head(out16, b["attention_mask"])))
        max_diff = max(max_diff, float(np.abs(out32 - out16).max()))
    worst = float(np.concatenate(sentence_cos).min())
    if worst < min_cos:
        raise StageError(f"{name}: min sentence cosine vs fp32 {worst:.6f} < {min_cos} "
                         "(fp16.parity.min_sentence_cosine); keep sensitive ops in fp32 via fp16.op_block_list / "
                         "node_block_list")
    return {"checked": True, "device": "cpu", "min_sentence_cosine_at_least": min_cos}, {
        "min_sentence_cosine": worst, "min_token_cosine": float(np.concatenate(token_cos).min()),
        "max_abs_diff": max_diff}


def run(cfg: dict, onnx_dir: Path, split_dir: Path, out_dir: Path) -> dict:
    """Writes the fp16 graphs and report.json to out_dir; returns the measured figures."""
    from transformers import AutoTokenizer

    from sbert_bundle.head import load_head

    tokenizer = AutoTokenizer.from_pretrained(split_dir / "transformer", trust_remote_code=False)
    head = load_head(split_dir / "modules")
    batches = validation_batches(tokenizer, head.max_seq_length, {"batch_sizes": [3], "lengths": [4, 40, 400]})
    report, measured = {}, {}
    for name, (src, dest) in PAIRS.items():
        if not (onnx_dir / src).is_file():
            log.info("%s: no %s, skipped", name, src)
            continue
        log.info("%s: converting %s", name, src)
        kept = convert(onnx_dir / src, out_dir / dest, cfg)
        gate, figures = parity(onnx_dir / src, out_dir / dest, batches, head,
                               cfg["parity"]["min_sentence_cosine"], name)
        report[name] = {"file": dest, "source": src, "nodes_kept_fp32": kept, "parity": gate}
        measured[name] = figures
        log.info("%s: %s", name, figures or gate["reason"])
    write_json(out_dir / "report.json", report)
    return measured


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        with atomic_dir(art / "fp16") as tmp:
            measured = run(params["fp16"], art / "onnx", art / "split", tmp)
        write_measured(art, "convert_fp16", measured)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
