"""Stage `export_onnx`: the Transformer to ONNX fp32, validated against PyTorch, plus a fused graph.

Reads artifacts/<model>/split/ (transformer/ and head.json's max_seq_length), writes artifacts/<model>/onnx/:
  model.onnx        fp32, dynamic batch and sequence axes, inputs exactly the tokenizer's
  model_fused.onnx  the same after onnxruntime's transformer optimizer (Attention, LayerNorm… fused);
                    attention fusion only for the encoders it matches (ATTENTION_FUSION_ARCHS, right
                    padding), and the plain graph where no fusion validates (the reason logged)
  report.json       input names, the validation cases and tolerances passed, fusion statistics
                    (fusion_notes: what was off, why); the measured max |diff| goes to
                    artifacts/measured/<model>/export_onnx.json instead: it follows the CPU
The model is loaded with attn_implementation="eager": the SDPA graph does not fuse.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import numpy as np

from .common import (StageError, atomic_dir, cpu_session, load_model, stage_main, torch_threads, write_json,
                     write_measured)

log = logging.getLogger("stages.export_onnx")
OUTPUT_NAME = "last_hidden_state"


class ValidationError(StageError):
    """One or more exported outputs differ from PyTorch beyond tolerance."""


def validation_batches(tokenizer, max_len: int, cfg: dict) -> list[dict]:
    """Padded batches of several sizes and lengths (one longer than max_len, so truncated)."""
    words = "the model turns this sentence into numbers while padding and truncation are tested".split()
    batches = []
    for size in cfg["batch_sizes"]:
        for length in cfg["lengths"]:
            texts = [" ".join(words[j % len(words)] for j in range(max(1, length - 7 * i))) for i in range(size)]
            enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="np")
            batches.append({k: v.astype(np.int64) for k, v in enc.items()})
    return batches


def compare(name: str, ort_out: dict, ref: np.ndarray, atol: float, case: str) -> list[str]:
    """Names, then shapes, then values: each failure as one line."""
    if name not in ort_out:
        return [f"{case}: output {name!r} missing; graph has {sorted(ort_out)}"]
    got = ort_out[name]
    if got.shape != ref.shape:
        return [f"{case}: {name} shape {got.shape}, PyTorch {ref.shape}"]
    diff = float(np.abs(got.astype(np.float32) - ref).max())
    return [] if diff <= atol else [f"{case}: {name} max |diff| {diff:.3g} > atol {atol:g}"]


def validate(session, torch_model, input_names: list[str], batches: list[dict], atol: float,
             label: str) -> tuple[dict, float]:
    """(the cases and the tolerance they passed, the largest |diff| measured); ValidationError past atol."""
    import torch

    failures, worst = [], 0.0
    for b in batches:
        feed = {n: b[n] for n in input_names}
        case = f"{label} batch {tuple(b['input_ids'].shape)}"
        with torch.no_grad(), torch_threads():
            ref = torch_model(*(torch.from_numpy(feed[n]) for n in input_names)).numpy()
        outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        failures += compare(OUTPUT_NAME, outs, ref, atol, case)
        if OUTPUT_NAME in outs and outs[OUTPUT_NAME].shape == ref.shape:
            worst = max(worst, float(np.abs(outs[OUTPUT_NAME] - ref).max()))
    if failures:
        raise ValidationError(f"{label} graph differs from PyTorch:\n  " + "\n  ".join(failures))
    return {"cases": [list(b["input_ids"].shape) for b in batches], "atol": atol}, worst


def export(model_dir: Path, out_path: Path, opset: int):
    """Export; returns (wrapped torch model, input names)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager",
                                      trust_remote_code=False).eval()
    accepted = inspect.signature(model.forward).parameters
    input_names = [n for n in tokenizer.model_input_names if n in accepted]
    if "input_ids" not in input_names:
        raise StageError(f"{model_dir}: model {type(model).__name__} does not take input_ids from its tokenizer")

    class LastHiddenState(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(input_names, inputs))).last_hidden_state

    wrapped = LastHiddenState().eval()
    sample = tokenizer(["a short one", "and a somewhat longer example sentence"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "sequence"} for n in input_names}
    axes[OUTPUT_NAME] = {0: "batch", 1: "sequence"}
    try:
        torch.onnx.export(wrapped, tuple(sample[n] for n in input_names), str(out_path), input_names=input_names,
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        arch = ", ".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise StageError(f"cannot export {arch} ({model.config.model_type}) from {model_dir} to ONNX: "
                         f"{type(e).__name__}: {e}") from None
    return wrapped, tokenizer, input_names


# Encoders whose self-attention onnxruntime's `bert` fusions match (a bidirectional attention whose
# padding mask the fused Attention op reads as right-padded lengths).
ATTENTION_FUSION_ARCHS = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet", "electra")


def fusion_plan(cfg: dict, config, padding_side: str) -> str:
    """'' when every fusion of the optimizer's model_type applies, else why attention fusion is off."""
    if config.model_type not in ATTENTION_FUSION_ARCHS:
        return (f"{config.model_type} is not an encoder onnxruntime's {cfg['model_type']} attention fusion "
                "matches: LayerNorm / GELU fusions only")
    if padding_side == "left":
        return "padding_side is left: the fused Attention reads the mask as right-padded lengths"
    return ""


def fuse(plain: Path, out_path: Path, cfg: dict, config, attention_off: str = "") -> dict:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(cfg["model_type"])
    if attention_off:
        options.enable_attention = options.enable_embed_layer_norm = options.enable_rotary_embeddings = False
    opt = optimize_model(str(plain), model_type=cfg["model_type"],
                         num_heads=cfg["num_heads"] or config.num_attention_heads,
                         hidden_size=cfg["hidden_size"] or config.hidden_size,
                         optimization_options=options, opt_level=cfg["opt_level"], use_gpu=False)
    opt.save_model_to_file(str(out_path))
    stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    log.info("fused graph: %s", stats)
    return stats


def fuse_and_validate(plain: Path, fused: Path, cfg: dict, torch_model, input_names, batches, head) -> dict:
    """The fused graph, validated; fusion narrowed (attention off), then off (the plain graph as the
    fused variant) with the reason logged and recorded, rather than failing the pipeline."""
    import shutil

    config = torch_model.model.config
    notes = []
    why = fusion_plan(cfg["fused"], config, head.padding_side)
    if why:
        log.warning("fusion: attention fusion off for this model: %s", why)
        notes.append(f"attention fusion off: {why}")
    for attention_off in ([why] if why else ["", "the fully fused graph failed"]):
        try:
            stats = fuse(plain, fused, cfg["fused"], config, attention_off)
            result, worst = validate(cpu_session(fused), torch_model, input_names, batches,
                                     cfg["fused"]["atol"], "fp32-fused")
        except Exception as e:  # noqa: BLE001 - the optimizer and onnxruntime raise many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.warning("fusion (%s) failed: %s", "attention off" if attention_off else "all fusions", first)
            notes.append(f"{'attention off' if attention_off else 'all fusions'}: {first[:300]}")
            continue
        if attention_off and not why:
            notes.append("attention fusion off: the fully fused graph failed")
        return {"fusion": stats, "validation": result, "max_abs_diff": worst,
                **({"fusion_notes": notes} if notes else {})}
    log.warning("fusion off for this model: fp32-fused is the plain graph (%s)", "; ".join(notes))
    shutil.copyfile(plain, fused)
    result, worst = validate(cpu_session(fused), torch_model, input_names, batches, cfg["fused"]["atol"], "fp32-fused")
    return {"fusion": {}, "validation": result, "max_abs_diff": worst,
            "fusion_notes": notes + ["fusion off: fp32-fused is the plain graph"]}


def run(cfg: dict, split_dir: Path, out_dir: Path) -> dict:
    """Writes model.onnx, model_fused.onnx and report.json to out_dir; returns the measured figures."""
    import onnx

    from sbert_bundle.head import load_head

    model_dir = split_dir / "transformer"
    head = load_head(split_dir / "modules")
    max_len = head.max_seq_length
    plain, fused = out_dir / "model.onnx", out_dir / "model_fused.onnx"
    log.info("exporting %s (opset %d)", model_dir, cfg["opset"])
    torch_model, tokenizer, input_names = export(model_dir, plain, cfg["opset"])
    onnx.checker.check_model(str(plain))
    batches = validation_batches(tokenizer, max_len, cfg["validation"])
    report = {"input_names": input_names, "output_names": [OUTPUT_NAME], "opset": cfg["opset"]}
    fp32, worst = validate(cpu_session(plain), torch_model, input_names, batches, cfg["atol"], "fp32")
    report["validation"] = {"fp32": fp32}
    measured = {"max_abs_diff_vs_pytorch": {"fp32": worst}}
    log.info("fp32 matches PyTorch: max |diff| %.2g", worst)
    if cfg["fused"]["enabled"]:
        fused_report = fuse_and_validate(plain, fused, cfg, torch_model, input_names, batches, head)
        report["fusion"] = fused_report["fusion"]
        report["validation"]["fp32-fused"] = fused_report["validation"]
        if "fusion_notes" in fused_report:
            report["fusion_notes"] = fused_report["fusion_notes"]
        measured["max_abs_diff_vs_pytorch"]["fp32-fused"] = fused_report["max_abs_diff"]
        log.info("fused matches PyTorch: max |diff| %.2g", fused_report["max_abs_diff"])
    write_json(out_dir / "report.json", report)
    return measured


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        with atomic_dir(art / "onnx") as tmp:
            measured = run(params["export"], art / "split", tmp)
        write_measured(art, "export_onnx", measured)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
