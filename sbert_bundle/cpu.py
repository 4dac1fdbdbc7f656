"""What this CPU is, and which exact CPU variant runs fastest on such a CPU.

`Bundle.load(variant=None)` ranks the exact CPU variants by `exact_order(cpu_info())`: a rule on
the CPU's vendor and instruction-set flags, never on timings taken on another machine. Each rule
names the measurement it rests on (the command and date are in docs/openvino.md).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The flags that decide the order, and that benchmark tables print with every figure.
RELEVANT_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ORT_FIRST = ("fp32-fused", "fp32", "ov-fp32")
OV_FIRST = ("ov-fp32", "fp32-fused", "fp32")


@functools.lru_cache(maxsize=1)
def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """{"vendor", "model", "flags"} of the first CPU (Linux /proc/cpuinfo); elsewhere the
    platform's name and no flags, which selects the rules' default."""
    vendor, model, flags = "", platform.processor() or platform.machine(), []
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {"vendor": vendor, "model": model, "flags": flags}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "vendor_id" and not vendor:
            vendor = value
        elif key == "model name" and value:
            model = value
        elif key == "flags":
            flags = sorted(set(value.split()) & set(RELEVANT_FLAGS))
            break  # the first processor's block is enough: every core of a machine is alike
    return {"vendor": vendor, "model": model, "flags": flags}


def describe_cpu(info: dict) -> str:
    """One line for tables: model, vendor and the relevant flags."""
    return f"{info['model']} ({info['vendor'] or 'unknown vendor'}; {' '.join(info['flags']) or 'no AVX flags'})"


def exact_order(info: dict) -> tuple[tuple[str, ...], str]:
    """(exact CPU variant names, fastest first; why) for a CPU described by `cpu_info`.

    - AMX (Sapphire Rapids and later Xeons): onnxruntime first. Measured 2026-12-08 on a 2-core
      Xeon with AMX: OpenVINO f32 on the bundle's IR gave the same sentences/s as fp32-fused and
      1.5x its single-sentence latency.
    - AMD with AVX-512 (Zen 4 and later) and no AMX: OpenVINO first. Measured 2026-12-04 on a
      2-core EPYC with AVX-512 VNNI/BF16: OpenVINO f32 on our graph 310 sentences/s, onnxruntime
      fp32-fused 273 (issue 22).
    - Anything else (AVX2 only, Intel AVX-512 without AMX, other platforms): onnxruntime first,
      the default every earlier release was measured with; no measurement says otherwise.
    """
    flags = set(info["flags"])
    if "amx_bf16" in flags:
        return ORT_FIRST, "AMX CPU: onnxruntime fp32 first (OpenVINO f32 measured no faster on an AMX Xeon)"
    if info["vendor"] == "AuthenticAMD" and "avx512f" in flags:
        return OV_FIRST, "AMD CPU with AVX-512: OpenVINO f32 first (measured 1.14x onnxruntime on an AVX-512 EPYC)"
    return ORT_FIRST, "onnxruntime fp32 first (no measurement shows OpenVINO f32 faster on this kind of CPU)"
