"""Stage `quantize`: an INT8 variant that keeps parity (onnxruntime dynamic quantization).

Reads artifacts/<model>/onnx/model_fused.onnx, writes artifacts/<model>/int8/:
  model_int8.onnx   quantize.method dynamic: per-channel QInt8 of the op types in quantize.op_types;
                    weight_only: MatMulNBits (see the end of this docstring)
  report.json       what was changed, which nodes stay fp32 and why, calibration parity

Plain dynamic INT8 loses parity on BERT-like encoders (all-MiniLM-L6-v2: min cosine ~0.83,
per-channel ~0.97) because a few activation channels carry outliers 10-30x the rest, and
one dynamic scale per tensor then leaves every other channel with a handful of levels.
Before quantizing, two edits that leave the fp32 function unchanged move the outliers:
  1. smoothing (SmoothQuant) on every quantized node fed by a LayerNorm output (the first
     feed-forward MatMul; Q/K/V where attention is not fused; Attention when quantized):
     x/s and W*s per input channel, s = amax(x)^alpha / amax(W)^(1-alpha);
  2. outlier split on the second feed-forward MatMul: its top-k input channels (after GELU)
     are computed by a small fp32 side path and removed from the quantized MatMul.
Nodes are found by graph structure (LayerNorm -> MatMul; MatMul -> BiasGelu -> MatMul), so
this carries over to other encoders that onnxruntime's BERT optimizer fuses the same way.

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
import json
import logging
from pathlib import Path

import numpy as np

from .common import StageError, atomic_dir, cpu_session, load_model, row_cosines, stage_main, write_json

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


def channel_absmax(model, tensors: list[str], batches: list[dict]) -> dict[str, np.ndarray]:
    """Largest |activation| per channel of each named tensor over the calibration batches."""
    import onnx

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = cpu_session(probe.SerializeToString())
    inputs = [i.name for i in session.get_inputs()]
    amax: dict[str, np.ndarray] = {}
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, {k: batch[k] for k in inputs})):
            per_channel = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            amax[name] = np.maximum(amax.get(name, 0.0), per_channel)
    return amax


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
        idx = np.argsort(amax[n2.input[0]])[::-1][:k]
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


def smooth(ed: GraphEditor, nodes: list, amax: dict, alpha: float) -> list[str]:
    """x -> x/s before the node and W -> W*s (rows), s normalised to geometric mean 1."""
    from onnx import helper

    for n in nodes:
        w = ed.get(n.input[1])
        s = np.maximum(amax[n.input[0]], 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)
        s /= np.exp(np.log(s).mean())
        ed.put(n.input[1], w * s[:, None])
        ed.add(n.name + "_sinv", 1.0 / s)
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
                             "min_cosine_vs_fp32": float(cos.min()), "mean_cosine_vs_fp32": float(cos.mean())}
    log.info("int8 vs fp32 on the calibration corpus: min cosine %.5f, mean %.5f", cos.min(), cos.mean())
    if cos.min() < cfg["min_calibration_cosine"]:
        raise StageError(f"int8 min cosine vs fp32 on {cfg['calibration_corpus']} is {cos.min():.5f} < "
                         f"quantize.min_calibration_cosine {cfg['min_calibration_cosine']}")
    write_json(out_dir / "report.json", report)
    return report


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
        amax = channel_absmax(model, watched, batches)
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
        with atomic_dir(art / "int8") as tmp:
            if cfg["enabled"]:
                run(cfg, art / "onnx", art / "split", tmp)
            else:
                write_json(tmp / "report.json", {"skipped": True, "reason": "quantize.enabled is false"})

    stage_main(__doc__, body)


if __name__ == "__main__":
    main()
