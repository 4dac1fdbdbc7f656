"""Stage `build_trt`: TensorRT plans from the ONNX graph (TensorRT 10 or 11 Python API).

Precision comes from the graph, not from builder flags: the network is strongly typed (the
only mode TensorRT 11 has; FP16 builder flags and per-layer precision are gone there). An
fp16 plan is built from artifacts/<model>/fp16/model_fp16.onnx, the onnxconverter-common graph that
already passed the fp16 parity gate with conf/fp16's ops kept in fp32; an fp32 plan from
artifacts/<model>/onnx/model.onnx with TF32 off. (The fused graphs hold onnxruntime-only ops that
TensorRT does not parse.)

One plan per GPU target of trt.targets (name -> compute capability, Ray resource, profiles).
A target is built only where TensorRT imports and the first visible CUDA GPU has exactly the
target's compute capability (CUDA_VISIBLE_DEVICES, or Ray, chooses that GPU); otherwise it is
recorded as skipped with the reason. Writes artifacts/<model>/trt/<target>/:
  <plan>.plan      one plan holding every optimization profile of the target (its own
                   `profiles`, or conf/trt/profiles)
  build.json       target, compute capability, and the plan with its metadata (TensorRT
                   version, GPU, compute capability, profiles, flags), or `skipped` with the reason
`--target NAME` builds only that target (replacing only artifacts/<model>/trt/NAME/; dvc.yaml's
cells build_trt@<model>-<target>); without it, every target (replacing artifacts/<model>/trt/).
Each target's timing cache (artifacts/<model>/<trt.timing_cache>/<target>.cache) is read before
and written after its build, so rebuilds on this machine reuse measured tactics; it is not a DVC
output (a persistent output turns off the run-cache that brings plans back from Ray workers).

Where TensorRT exists:  pip install tensorrt-cu13 (or -cu12), then `dvc repro build_trt`.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from sbert_bundle.manifest import COMPUTE_CAPABILITY, MAX_TRT_TARGETS, TARGET_NAME
from sbert_bundle.trt import sm

from .common import StageError, atomic_dir, atomic_file, load_model, stage_main, write_json

log = logging.getLogger("stages.build_trt")
GRAPHS = {"fp16": Path("fp16") / "model_fp16.onnx", "fp32": Path("onnx") / "model.onnx"}  # under artifacts/<model>/
HARDWARE_LEVELS = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def availability() -> tuple[object | None, str]:
    """(tensorrt module, "") or (None, why not)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return None, f"TensorRT is not installed ({e}); where it can be: pip install tensorrt-cu13"
    try:
        import torch

        if not torch.cuda.is_available():
            return None, "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    except ImportError:
        return None, "torch is needed on the build side to query the GPU"
    return trt, ""


def gpu_info() -> dict:
    """Name and compute capability of the first visible CUDA GPU: the one TensorRT builds on."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def targets(cfg: dict) -> dict[str, dict]:
    """trt.targets checked: {name: {compute_capability, resource, profiles}}, profiles filled in
    from trt.profiles where a target has none of its own."""
    found = cfg.get("targets")
    if not isinstance(found, dict) or not found:
        raise StageError("trt.targets must name at least one GPU target, e.g. "
                         "h100: {compute_capability: \"9.0\", resource: gpu_h100, profiles: null}")
    if len(found) > MAX_TRT_TARGETS:
        raise StageError(f"trt.targets has {len(found)} targets; at most {MAX_TRT_TARGETS}")
    checked = {}
    for name, spec in found.items():
        if not isinstance(name, str) or not TARGET_NAME.fullmatch(name):
            raise StageError(f"trt.targets has {name!r}: a target name is lowercase letters, digits, - and _ "
                             "(at most 32, starting with a letter or digit)")
        if not isinstance(spec, dict):
            raise StageError(f"trt.targets.{name}: expected {{compute_capability, resource, profiles}}, got {spec!r}")
        unknown = set(spec) - {"compute_capability", "resource", "profiles"}
        if unknown:
            raise StageError(f"trt.targets.{name} has {sorted(unknown)}; known: compute_capability, resource, profiles")
        capability = spec.get("compute_capability")
        if not isinstance(capability, str) or not COMPUTE_CAPABILITY.fullmatch(capability):
            raise StageError(f"trt.targets.{name}.compute_capability is {capability!r}; expected a quoted "
                             "MAJOR.MINOR such as \"8.9\"")
        if not isinstance(spec.get("resource"), str) or not spec["resource"]:
            raise StageError(f"trt.targets.{name}.resource is {spec.get('resource')!r}; expected the name of the "
                             "Ray resource of nodes with this GPU, such as gpu_h100")
        profiles = spec.get("profiles") or cfg["profiles"]
        if not isinstance(profiles, dict) or not profiles:
            raise StageError(f"trt.targets.{name}.profiles: expected null (trt.profiles) or a mapping of "
                             "profile name -> {min, opt, max, per_input}")
        checked[name] = {"compute_capability": capability, "resource": spec["resource"], "profiles": profiles}
    return checked


def selected(cfg: dict, only: str | None) -> dict[str, dict]:
    """The targets to build: all of trt.targets, or the one named by --target."""
    known = targets(cfg)
    if only is None:
        return known
    if only not in known:
        raise StageError(f"--target {only!r} is not in trt.targets; known: {', '.join(known)}")
    return {only: known[only]}


def target_skip(name: str, target: dict, gpu: dict) -> str:
    """Why this GPU cannot build the target's plan ("" when its compute capability is the target's)."""
    if gpu["compute_capability"] == target["compute_capability"]:
        return ""
    return (f"this GPU is {sm(gpu['compute_capability'])} ({gpu['gpu']}); target {name} needs "
            f"{target['compute_capability']}")


def profile_shapes(profile: dict, input_names: list[str], name: str) -> dict[str, dict]:
    """min/opt/max per network input; names in per_input must exist in the network."""
    unknown = set(profile.get("per_input") or {}) - set(input_names)
    if unknown:
        raise StageError(f"trt.profiles.{name}.per_input names {sorted(unknown)}; "
                         f"the network's inputs are {input_names}")
    shapes = {}
    for inp in input_names:
        spec = (profile.get("per_input") or {}).get(inp, profile)
        shapes[inp] = {k: tuple(int(x) for x in spec[k]) for k in ("min", "opt", "max")}
        if not all(a <= b <= c for a, b, c in zip(*shapes[inp].values())):
            raise StageError(f"trt.profiles.{name} for {inp}: need min <= opt <= max, got {shapes[inp]}")
    return shapes


def check_coverage(profiles: dict, max_seq_length: int) -> None:
    """Some profile must take sequences as long as the tokenizer produces."""
    longest = max(spec["max"][1] for spec in profiles.values())
    if longest < max_seq_length:
        raise StageError(f"trt.profiles allow sequences up to {longest} tokens, but the model's max_seq_length "
                         f"is {max_seq_length}: raise the max length of a profile")


def settings(cfg: dict) -> dict:
    """The builder settings conf/trt asks for, checked before TensorRT is touched."""
    if cfg["precision"] not in GRAPHS:
        raise StageError(f"trt.precision is {cfg['precision']!r}; choose one of {sorted(GRAPHS)}")
    level = str(cfg["hardware_compatibility"]).lower()
    if level not in HARDWARE_LEVELS:
        raise StageError(f"trt.hardware_compatibility is {cfg['hardware_compatibility']!r}; "
                         f"choose one of {sorted(HARDWARE_LEVELS)}")
    if cfg["exclude_lean_runtime"] and not cfg["version_compatible"]:
        raise StageError("trt.exclude_lean_runtime needs trt.version_compatible: true")
    flags = ["VERSION_COMPATIBLE"] * bool(cfg["version_compatible"]) + \
        ["EXCLUDE_LEAN_RUNTIME"] * bool(cfg["exclude_lean_runtime"])
    return {"precision": cfg["precision"], "hardware_compatibility": HARDWARE_LEVELS[level], "flags": flags,
            "tf32": cfg["precision"] != "fp32"}  # fp32 plans must match the fp32 graph: no TF32 matmuls


def network_flags(trt) -> int:
    """Strongly typed: TensorRT 11 has no other mode (its flag is ignored); 10 needs the flag."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build(trt, onnx_path: Path, cfg: dict, cache_path: Path, out_dir: Path, target: str = "") -> dict:
    """One plan of cfg["profiles"] on the first visible GPU; target: the GPU target it is for."""
    wanted = settings(cfg)
    if int(trt.__version__.split(".")[0]) < 10:
        raise StageError(f"TensorRT {trt.__version__} is installed; build_trt needs TensorRT 10 or later")
    if not onnx_path.is_file():
        raise StageError(f"{onnx_path} not found: a {cfg['precision']} plan is built from it "
                         "(run the export_onnx and convert_fp16 stages first)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for e in errors:
            log.error("ONNX parser: %s", e)
        raise StageError(f"TensorRT could not parse {onnx_path}: {len(errors)} error(s), first: {errors[:1]}")
    input_names = [network.get_input(i).name for i in range(network.num_inputs)]

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg["workspace_gib"] * (1 << 30)))
    if not wanted["tf32"]:
        config.clear_flag(trt.BuilderFlag.TF32)
    for flag in wanted["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    level = getattr(trt.HardwareCompatibilityLevel, wanted["hardware_compatibility"], None)
    if level is None:
        raise StageError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                         f"{wanted['hardware_compatibility']}; it has {list(trt.HardwareCompatibilityLevel.__members__)}")
    config.hardware_compatibility_level = level

    profiles = {}
    for name, spec in cfg["profiles"].items():
        shapes = profile_shapes(spec, input_names, name)
        profile = builder.create_optimization_profile()
        for inp, s in shapes.items():
            profile.set_shape(inp, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
        profiles[name] = {inp: {k: list(v) for k, v in s.items()} for inp, s in shapes.items()}

    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise StageError(f"the timing cache {cache_path} does not match this GPU / TensorRT: delete it to rebuild it")
    gpu = gpu_info()
    log.info("TensorRT %s builder config: target=%s onnx=%s strongly typed, precision from the graph (%s), tf32=%s "
             "flags=%s hardware_compatibility=%s workspace=%sGiB profiles=%s gpu=%s", trt.__version__, target,
             onnx_path, wanted["precision"], wanted["tf32"], wanted["flags"], wanted["hardware_compatibility"],
             cfg["workspace_gib"], profiles, gpu)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise StageError(f"TensorRT build of {onnx_path} failed (see the TensorRT errors above)")
    elapsed = time.perf_counter() - start
    log.info("TensorRT build took %.1f s", elapsed)
    runs_on = {"NONE": gpu["gpu"], "AMPERE_PLUS": "ampere-plus",
               "SAME_COMPUTE_CAPABILITY": f"sm{gpu['compute_capability']}"}[wanted["hardware_compatibility"]]
    slug = re.sub(r"[^a-z0-9]+", "-", runs_on.lower()).strip("-")
    name = f"trt-{wanted['precision']}-{'+'.join(profiles)}-{slug}-trt{trt.__version__}"
    (out_dir / f"{name}.plan").write_bytes(bytes(plan))
    with atomic_file(cache_path) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    metadata = {"target": target, "tensorrt_version": trt.__version__, **gpu, "profiles": profiles,
                "profile_order": list(profiles), "flags": wanted["flags"],
                "hardware_compatibility": wanted["hardware_compatibility"], "strongly_typed": True,
                "tf32": wanted["tf32"], "source_graph": onnx_path.name, "input_names": input_names,
                "build_seconds": round(elapsed, 1)}
    return {"name": name, "file": f"{name}.plan", "precision": wanted["precision"], "metadata": metadata}


def run_target(cfg: dict, name: str, target: dict, onnx_path: Path | None, out_dir: Path,
               max_seq_length: int | None = None, found: tuple | None = None) -> dict:
    """Build (or record why not) the plan of one GPU target into out_dir (artifacts/trt/<name>).

    found: (tensorrt module or None, why not) from `availability()`, asked once per run."""
    cache_path = Path(cfg["timing_cache"]) / f"{name}.cache"
    record = {"target": name, "compute_capability": target["compute_capability"], "skipped": True, "plans": []}
    if not cfg["enabled"]:
        record["reason"] = "trt.enabled is false"
    else:
        trt, why = found or availability()
        why = why or target_skip(name, target, gpu_info())
        if why:
            log.info("target %s: TensorRT plan skipped: %s", name, why)
            record["reason"] = why
        else:
            if max_seq_length:  # only plans must take the longest input: no plan, nothing to cover
                check_coverage(target["profiles"], max_seq_length)
            plan = build(trt, onnx_path, {**cfg, "profiles": target["profiles"]}, cache_path, out_dir, name)
            record.update(skipped=False, reason=None, plans=[plan])
    if not cache_path.exists():  # an empty cache is a valid start for the next build
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(b"")
    write_json(out_dir / "build.json", record)
    return record


def run(cfg: dict, onnx_path: Path | None, out_dir: Path, max_seq_length: int | None = None,
        only: str | None = None) -> dict[str, dict]:
    """Every target of trt.targets (or only the one named) into out_dir/<target>/: {target: record}."""
    settings(cfg)
    chosen = selected(cfg, only)
    found = availability() if cfg["enabled"] else (None, "")
    records = {}
    for name, target in chosen.items():
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        records[name] = run_target(cfg, name, target, onnx_path, out_dir / name, max_seq_length, found)
    return records


def main() -> None:
    def body(args):
        from sbert_bundle.head import load_head

        _, params, art = load_model(args)
        cfg = {**params["trt"], "timing_cache": str(art / params["trt"]["timing_cache"])}
        settings(cfg)
        chosen = selected(cfg, args.target)  # an unknown --target stops here, before anything is written
        graph = GRAPHS.get(cfg["precision"])
        graph = graph and art / graph
        max_seq_length = load_head(art / "split" / "modules").max_seq_length
        out = art / "trt"
        if args.target is None:  # every target: artifacts/<model>/trt/ is replaced whole (no stale targets stay)
            with atomic_dir(out) as tmp:
                run(cfg, graph, tmp, max_seq_length)
        else:  # one target: only artifacts/trt/<target>/ is replaced
            (name, target), = chosen.items()
            found = availability() if cfg["enabled"] else (None, "")
            with atomic_dir(out / name) as tmp:
                run_target(cfg, name, target, graph, tmp, max_seq_length, found)

    def add_args(parser):
        parser.add_argument("--target", help="build only this GPU target of trt.targets (default: all of them)")

    stage_main(__doc__, body, add_args)


if __name__ == "__main__":
    main()
