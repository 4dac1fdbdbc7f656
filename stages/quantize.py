"""Stage `quantize`: an INT8 variant that keeps parity (onnxruntime dynamic quantization).

Reads artifacts/<model>/onnx/model_fused.onnx, writes artifacts/<model>/int8/:
  model_int8.onnx   quantize.method dynamic: per-channel QInt8 of the op types in quantize.op_types;
                    weight_only: MatMulNBits (see the end of this docstring)
  report.json       what was changed, which nodes stay fp32 and why, the calibration parity gate passed
                    (the measured cosines: artifacts/measured/<model>/quantize.json)

Plain dynamic INT8 loses parity on BERT-like encoders (all-MiniLM-L6-v2: min cosine ~0.83,
per-channel ~0.97) because a few activation channels carry outliers 10-30x the rest, and
one dynamic scale per tensor then leaves every other channel with a handful of levels.
Before quantizing, two edits that leave the fp32 function unchanged move the outliers:
  1. smoothing (SmoothQuant) on every quantized node fed by a LayerNorm output (the first
     feed-forward MatMul; Q/K/V where attention is not fused; Attention when quantized):
     x/s and W*s per input channel, s = amax(x)^alpha / amax(W)^(1-alpha) rounded to a grid
     of eight steps per power of two;
  2. outlier split on the second feed-forward MatMul: its top-k input channels (after GELU)
     are computed by a small fp32 side path and removed from the quantized MatMul.
Nodes are found by graph structure (LayerNorm -> MatMul; MatMul -> BiasGelu -> MatMul), so
this carries over to other encoders that onnxruntime's BERT optimizer fuses the same way.

The same int8 bytes on every x86-64 CPU: amax, the statistic both edits read, is not taken from
onnxruntime's float32 kernels (whose last bits follow the instruction set: AVX2, AVX-512, AMX)
but computed in float64 by onnx's reference evaluator on the plain graph model.onnx (every
initializer and cast widened to float64); each watched tensor of the fused graph is matched to
the plain graph's tensor feeding the MatMul with byte-identical weights. Float64 results differ
between CPUs by ~1e-15 relative, so neither the top-k channel choice nor a grid step of the
smoothing factors can move (tests/test_reproducible.py perturbs amax by 1e-6 and gets the same
bytes).

The attention output projection (the MatMul fed by each Attention) stays fp32 when
quantize.attention_output_fp32 is set. On x86 CPUs without VNNI (AVX2, or AVX-512 without
VNNI) onnxruntime's u8s8 kernel multiplies with VPMADDUBSW, which saturates sums of two u8*s8
products at int16; the attention context, quantized with a zero point near 128, is hit
hardest there. all-MiniLM-L6-v2 on an AVX2-only CPU (onnxruntime 1.32.0, verify's corpus):
every MatMul int8 0.988118 min cosine (0.994349 with the same weights in exact integer
arithmetic, as a VNNI CPU computes it); attention output fp32 0.993644 (0.994428 exact), at
the same throughput. 7-bit weights (reduce_range) 0.985578; QUInt8 weights 0.993991, ~2x slower.

quantize.method: weight_only instead writes MatMulNBits nodes (onnxruntime's MatMulNBitsQuantizer):
weights in int8 per block of quantize.weight_only.block_size input channels, and with
accuracy_level 4 the activations quantized per row and block at run time, so one token's
outliers no longer set the scale of every other token in the batch. For models whose outliers
the edits above do not tame. all-mpnet-base-v2, verify's evaluation corpus, against the fp32
fused graph (scratch runs /tmp/exp/mpeval.py, 2026-11-27): dynamic with the edits 0.979233
min cosine, weight_only (8 bits, block 32) 0.995906; all-MiniLM-L6-v2 0.998276 (block 128:
0.995228). On this AVX2 CPU its kernel runs below the fp32 graph's speed (MiniLM about 0.8x).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from tqdm import tqdm

from .common import (StageError, atomic_dir, cpu_session, load_model, progress_enabled, row_cosines, stage_main,
                     write_json, write_measured)

log = logging.getLogger("stages.quantize")
SIDE_PATH = "_Outlier_"  # name marker of the fp32 side-path nodes


def calibration_batches(split_dir: Path, corpus: Path, batch_size: int = 32) -> tuple[list[dict], object]:
    from sbert_bundle.head import load_head
    from sbert_bundle.tokenization import TOKENIZER_FILE, TextTokenizer

    head = load_head(split_dir / "modules")
    tokenizer = TextTokenizer(split_dir / "transformer" / TOKENIZER_FILE, head)
    sentences = [json.loads(line) for line in Path(corpus).read_text(encoding="utf-8").splitlines()]
    sentences.sort(key=len)
    return [tokenizer(sentences[i:i + batch_size]) for i in range(0, len(sentences), batch_size)], head


def find_targets(graph) -> tuple[list, list[tuple]]:
    """Attention nodes, and (ffn1 MatMul, BiasGelu, ffn2 MatMul) triples of each feed-forward block."""
    inits = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    attention = [n for n in graph.node if n.op_type == "Attention"]
    ffn = []
    for n2 in graph.node:
        gelu = producer.get(n2.input[0]) if n2.op_type == "MatMul" else None
        if gelu is None or gelu.op_type != "BiasGelu" or n2.input[1] not in inits:
            continue
        n1 = producer.get(gelu.input[0])
        if n1 is not None and n1.op_type == "MatMul" and n1.input[1] in inits:
            ffn.append((n1, gelu, n2))
    return attention, ffn


LAYER_NORMS = {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"}


def layernorm_fed(graph, op_types: list[str]) -> list:
    """Quantized nodes (MatMul with a constant weight, or Attention) whose input is a LayerNorm
    output: the activations with per-channel outliers that smoothing evens out."""
    inits = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    return [n for n in graph.node if n.op_type in op_types and n.op_type in ("MatMul", "Attention")
            and len(n.input) > 1 and n.input[1] in inits
            and getattr(producer.get(n.input[0]), "op_type", None) in LAYER_NORMS]


ATTENTION = {"Attention", "MultiHeadAttention"}


def attention_output(graph) -> list:
    """MatMuls with a constant weight fed by attention: a fused Attention node's output, or (unfused)
    Reshape/Transpose of the probabilities x V MatMul."""
    inits = {i.name for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def attention_fed(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose"):
            node = producer.get(node.input[0])
        return node is not None and (node.op_type in ATTENTION or (
            node.op_type == "MatMul" and not any(i in inits for i in node.input)))

    return [n for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
            and attention_fed(n.input[0])]


def weight_digests(model) -> dict[str, str]:
    """Input tensor of each MatMul with a constant weight, keyed by the sha256 of that weight's values."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits:
            digest = hashlib.sha256(numpy_helper.to_array(inits[n.input[1]]).tobytes()).hexdigest()
            out.setdefault(digest, n.input[0])
    return out


def plain_twins(plain, model, tensors: list[str]) -> dict[str, str]:
    """For each tensor of `model` (the fused graph) that feeds a MatMul with a constant weight, the
    tensor of `plain` that feeds the MatMul with the same weight values: the same activation."""
    fused_by_weight = {v: k for k, v in weight_digests(model).items()}
    plain_inputs = weight_digests(plain)
    twins = {}
    for name in tensors:
        digest = fused_by_weight.get(name)
        if digest is None or digest not in plain_inputs:
            raise StageError(f"quantize: the fused graph's tensor {name!r} feeds no MatMul whose weights are also "
                             "in model.onnx, so its float64 statistics cannot be computed on the plain graph; "
                             "set quantize.source to plain")
        twins[name] = plain_inputs[digest]
    return twins


def float64_graph(model):
    """A copy of `model` computing in float64: float initializers, constants and casts widened."""
    import onnx
    from onnx import TensorProto, numpy_helper

    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph

    def widen(tensor):
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))

    for init in graph.initializer:
        widen(init)
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
            elif node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    for value in list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return wide


def channel_absmax(plain, model, tensors: list[str], batches: list[dict]) -> dict[str, np.ndarray]:
    """Largest |activation| per channel of each named tensor of `model` over the calibration batches,
    computed in float64 on its twin in `plain` (onnx.reference; see the module docstring)."""
    from onnx.reference import ReferenceEvaluator

    twins = plain_twins(plain, model, tensors)
    wanted = sorted(set(twins.values()))
    evaluator = ReferenceEvaluator(float64_graph(plain))
    inputs = [i.name for i in plain.graph.input]
    amax: dict[str, np.ndarray] = {}
    for batch in tqdm(batches, desc="float64 calibration", unit="batch", disable=not progress_enabled()):
        for name, value in zip(wanted, evaluator.run(wanted, {k: batch[k] for k in inputs})):
            per_channel = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = np.maximum(amax.get(name, 0.0), per_channel)
    return {name: amax[twin] for name, twin in twins.items()}


class GraphEditor:
    """Initializer access and node insertion around existing nodes, applied in one pass."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.np = numpy_helper
        self.graph = model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.before: dict[str, list] = {}
        self.after: dict[str, list] = {}

    def get(self, name: str) -> np.ndarray:
        return self.np.to_array(self.inits[name]).copy()

    def put(self, name: str, value: np.ndarray) -> None:
        self.inits[name].CopyFrom(self.np.from_array(value.astype(np.float32), name))

    def add(self, name: str, value: np.ndarray) -> str:
        self.graph.initializer.append(self.np.from_array(value.astype(np.float32), name))
        return name

    def commit(self) -> None:
        nodes = [x for n in list(self.graph.node) for x in self.before.get(n.name, []) + [n] + self.after.get(n.name, [])]
        del self.graph.node[:]
        self.graph.node.extend(nodes)


def split_outliers(ed: GraphEditor, ffn: list[tuple], amax: dict, k: int) -> dict[str, list[int]]:
    """Move the top-k GELU channels of each feed-forward block to an fp32 side path."""
    from onnx import helper

    moved = {}
    for n1, gelu, n2 in ffn:
        idx = np.argsort(-amax[n2.input[0]], kind="stable")[:k]  # stable: ties in input order on every CPU
        w1, w2, bias = ed.get(n1.input[1]), ed.get(n2.input[1]), ed.get(gelu.input[1])
        p = n2.name
        ed.add(p + "_oW1", w1[:, idx])
        ed.add(p + "_ob", bias[idx])
        ed.add(p + "_oW2", w2[idx])
        w1[:, idx] = 0
        w2[idx] = 0
        ed.put(n1.input[1], w1)
        ed.put(n2.input[1], w2)
        out = n2.output[0]
        n2.output[0] = out + "_main"
        ed.before.setdefault(n1.name, []).extend([
            helper.make_node("MatMul", [n1.input[0], p + "_oW1"], [p + "_oh"], name=p + SIDE_PATH + "MatMul1"),
            helper.make_node("BiasGelu", [p + "_oh", p + "_ob"], [p + "_og"], name=p + SIDE_PATH + "Gelu",
                             domain="com.microsoft"),
            helper.make_node("MatMul", [p + "_og", p + "_oW2"], [p + "_oy"], name=p + SIDE_PATH + "MatMul2")])
        ed.after.setdefault(n2.name, []).append(
            helper.make_node("Add", [out + "_main", p + "_oy"], [out], name=p + SIDE_PATH + "Add"))
        moved[p] = [int(i) for i in idx]
    return moved


# Smoothing factors are rounded to 2^(k/STEPS_PER_OCTAVE): within 4.4% of the exact factor (on
# all-MiniLM-L6-v2 the mean cosine to fp32 stayed the same, the worst sentence moved: see
# docs/reproducibility.md), and a grid step (0.125 in log2) that float64 differences (~1e-15) cannot cross.
STEPS_PER_OCTAVE = 8
_OCTAVE = np.array([2.0 ** (j / STEPS_PER_OCTAVE) for j in range(STEPS_PER_OCTAVE)], dtype=np.float32)


def smoothing_factors(x_amax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """s = amax(x)^alpha / amax(W)^(1-alpha) per input channel, normalised to geometric mean 1 and
    rounded to the grid 2^(k/STEPS_PER_OCTAVE) (float32 values from one fixed table): s moves only
    if log2 of its float64 value sits within float64 noise of a grid boundary."""
    x_amax = np.maximum(np.asarray(x_amax, np.float64), 1e-5)
    w_amax = np.maximum(np.abs(w).max(axis=1).astype(np.float64), 1e-5)
    log_s = alpha * np.log2(x_amax) - (1 - alpha) * np.log2(w_amax)
    k = np.round((log_s - log_s.mean()) * STEPS_PER_OCTAVE).astype(np.int64)
    return np.ldexp(_OCTAVE[k % STEPS_PER_OCTAVE], (k // STEPS_PER_OCTAVE).astype(np.int32)).astype(np.float32)


def smooth(ed: GraphEditor, nodes: list, amax: dict, alpha: float) -> list[str]:
    """x -> x/s before the node and W -> W*s (rows), s from smoothing_factors."""
    from onnx import helper

    for n in nodes:
        w = ed.get(n.input[1])
        s = smoothing_factors(amax[n.input[0]], w, alpha)
        ed.put(n.input[1], w * s[:, None])
        ed.add(n.name + "_sinv", np.float32(1.0) / s)
        ed.before.setdefault(n.name, []).append(
            helper.make_node("Mul", [n.input[0], n.name + "_sinv"], [n.name + "_smoothed"], name=n.name + "_SmoothMul"))
        n.input[0] = n.name + "_smoothed"
    return [n.name for n in nodes]


def embedding_cosines(fp32: Path, int8: Path, batches: list[dict], head) -> np.ndarray:
    sessions = [cpu_session(p) for p in (fp32, int8)]
    names = [i.name for i in sessions[0].get_inputs()]
    cos = []
    for b in batches:
        a, q = (head(s.run(None, {n: b[n] for n in names})[0], b["attention_mask"]) for s in sessions)
        cos.append(row_cosines(a, q))
    return np.concatenate(cos)


METHODS = ("dynamic", "weight_only")


@contextlib.contextmanager
def quiet_quantizer():
    """onnxruntime.quantization logs every tensor on the root logger: WARNING and up only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)


def weight_only(cfg: dict, src: Path, dest: Path) -> dict:
    """MatMulNBits: blockwise symmetric integer weights; activations quantized per row and block."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = cfg["weight_only"]
    allowed = {"bits": (4, 8), "block_size": (16, 32, 64, 128, 256), "accuracy_level": (0, 1, 2, 3, 4)}
    for key, values in allowed.items():  # what onnxruntime's MatMulNBits takes
        if w.get(key) not in values:
            raise StageError(f"quantize.weight_only.{key} is {w.get(key)!r}; choose one of {list(values)}")
    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(model, bits=w["bits"], block_size=w["block_size"], is_symmetric=True,
                                     accuracy_level=w["accuracy_level"], nodes_to_exclude=list(cfg["nodes_to_exclude"]))
    with quiet_quantizer():
        quantizer.process()
    quantized = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    if not count:
        raise StageError(f"quantize.method weight_only found no MatMul with a constant weight in {src}")
    onnx.save(quantized, str(dest))
    log.info("weight-only int%d: %d MatMulNBits (block %d, accuracy level %d)", w["bits"], count,
             w["block_size"], w["accuracy_level"])
    return {"method": "weight_only", "per_channel": False, "weight_type": f"int{w['bits']} blockwise symmetric",
            "source": src.name, "weight_only": dict(w), "matmul_nbits": count,
            "excluded_nodes": [{"node": n, "why": "quantize.nodes_to_exclude"} for n in cfg["nodes_to_exclude"]]}


def run(cfg: dict, onnx_dir: Path, split_dir: Path, out_dir: Path) -> dict:
    """Writes model_int8.onnx and report.json to out_dir; returns the measured figures."""
    src = onnx_dir / ("model_fused.onnx" if cfg["source"] == "fused" else "model.onnx")
    if not src.is_file():
        raise StageError(f"quantize.source {cfg['source']!r} needs {src}, which export_onnx did not write")
    if cfg["method"] not in METHODS:
        raise StageError(f"quantize.method is {cfg['method']!r}; choose one of {list(METHODS)}")
    batches, head = calibration_batches(split_dir, Path(cfg["calibration_corpus"]))
    if cfg["method"] == "weight_only":
        report = weight_only(cfg, src, out_dir / "model_int8.onnx")
    else:
        report = dynamic(cfg, src, out_dir, batches)
    cos = embedding_cosines(src, out_dir / "model_int8.onnx", batches, head)
    report["calibration"] = {"corpus": cfg["calibration_corpus"], "sentences": int(cos.size),
                             "min_cosine_vs_fp32_at_least": cfg["min_calibration_cosine"]}
    log.info("int8 vs fp32 on the calibration corpus: min cosine %.5f, mean %.5f", cos.min(), cos.mean())
    if cos.min() < cfg["min_calibration_cosine"]:
        raise StageError(f"int8 min cosine vs fp32 on {cfg['calibration_corpus']} is {cos.min():.5f} < "
                         f"quantize.min_calibration_cosine {cfg['min_calibration_cosine']}")
    write_json(out_dir / "report.json", report)
    return {"calibration": {"min_cosine_vs_fp32": float(cos.min()), "mean_cosine_vs_fp32": float(cos.mean())}}


def dynamic(cfg: dict, src: Path, out_dir: Path, batches: list[dict]) -> dict:
    """Outlier-moving edits, then onnxruntime's dynamic per-channel quantization (the module docstring)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    attention, ffn = find_targets(model.graph)
    report = {"method": "dynamic", "per_channel": cfg["per_channel"], "weight_type": cfg["weight_type"],
              "source": src.name, "attention_nodes": len(attention), "ffn_blocks": len(ffn)}
    attn_out = [n.name for n in attention_output(model.graph)] if cfg["attention_output_fp32"] else []
    report["attention_output_fp32"] = cfg["attention_output_fp32"]
    ed = GraphEditor(model)
    to_smooth = layernorm_fed(model.graph, cfg["op_types"]) if cfg["smoothing"]["enabled"] else []
    if to_smooth or cfg["outliers"]["enabled"]:
        watched = sorted({n.input[0] for n in to_smooth} | {t[2].input[0] for t in ffn})
        amax = channel_absmax(onnx.load(str(src.parent / "model.onnx")), model, watched, batches)
        if cfg["outliers"]["enabled"]:
            report["outlier_channels"] = split_outliers(ed, ffn, amax, cfg["outliers"]["k"])
        if to_smooth:
            report["smoothed"] = smooth(ed, to_smooth, amax, cfg["smoothing"]["alpha"])
            report["smoothing_alpha"] = cfg["smoothing"]["alpha"]
        ed.commit()
    prepared = out_dir / "prepared_fp32.onnx"
    onnx.save(model, str(prepared))
    side_path = [n.name for n in model.graph.node if SIDE_PATH in n.name]
    excluded = side_path + attn_out + list(cfg["nodes_to_exclude"])
    report["excluded_nodes"] = (
        [{"node": n, "why": "fp32 side path for outlier channels"} for n in side_path]
        + [{"node": n, "why": "attention output projection (quantize.attention_output_fp32: int16 saturation "
                              "of onnxruntime's u8s8 kernel on CPUs without VNNI)"} for n in attn_out]
        + [{"node": n, "why": "quantize.nodes_to_exclude"} for n in cfg["nodes_to_exclude"]])
    log.info("quantizing %s: %d Attention, %d feed-forward blocks, %d nodes kept fp32",
             src.name, len(attention), len(ffn), len(excluded))
    with quiet_quantizer():
        quantize_dynamic(str(prepared), str(out_dir / "model_int8.onnx"), op_types_to_quantize=list(cfg["op_types"]),
                         per_channel=cfg["per_channel"], reduce_range=cfg["reduce_range"],
                         weight_type=getattr(QuantType, cfg["weight_type"]), nodes_to_exclude=excluded,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    prepared.unlink()
    return report


def main() -> None:
    def body(args):
        _, params, art = load_model(args)
        cfg = params["quantize"]
        measured = {}
        with atomic_dir(art / "int8") as tmp:
            if cfg["enabled"]:
                measured = run(cfg, art / "onnx", art / "split", tmp)
            else:
                write_json(tmp / "report.json", {"skipped": True, "reason": "quantize.enabled is false"})
        write_measured(art, "quantize", measured)

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
