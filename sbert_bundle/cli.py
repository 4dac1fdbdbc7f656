"""`sbert-bundle` command line: encode sentences with a bundle, or inspect one."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .backends import BackendError, InstallError
from .bundle import Bundle, NonFiniteError, VariantError
from .cpu import describe_cpu
from .head import HeadError
from .manifest import IntegrityError, check_threads
from .trt import sm


def read_sentences(source: str) -> list[str]:
    """One sentence per line from a file or stdin ("-"), decoded as strict UTF-8."""
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    where = "standard input" if source == "-" else source
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} "
                         f"(byte offset {e.start}) ({e.reason})") from None
    return [line.rstrip("\r") for line in text.split("\n")[:-1 if text.endswith("\n") else None]] if text else []


def json_lines(emb: np.ndarray):
    """One JSON list per embedding, 7 decimals; never NaN (encode refuses non-finite output)."""
    for row in emb:
        yield json.dumps([round(float(x), 7) for x in row], allow_nan=False) + "\n"


def write_output(path: str, emb: np.ndarray) -> None:
    """Write beside path, then rename over it: a failed write leaves the old file (if any) as it was."""
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".npy"):
                np.save(f, emb)
            else:
                f.writelines(line.encode() for line in json_lines(emb))
        os.chmod(name, 0o644)
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


def _encode(args) -> None:
    if args.threads is not None:
        check_threads(args.threads, "--threads")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected 1 or more")
    sentences = read_sentences(args.input)
    bundle = Bundle.load(args.bundle, variant=args.variant, threads=args.threads, device_id=args.device_id)
    emb = bundle.encode(sentences, batch_size=args.batch_size, prompt=args.prompt, prompt_name=args.prompt_name)
    if args.output:
        write_output(args.output, emb)
        print(f"wrote {emb.shape[0]} x {emb.shape[1]} float32 embeddings to {args.output} "
              f"(variant {bundle.variant} on {bundle.device})", file=sys.stderr)
        return
    sys.stdout.writelines(json_lines(emb))


def _inspect(args) -> None:
    bundle = Bundle.load(args.bundle, variant=args.variant, device_id=args.device_id)
    info = bundle.describe()
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
        return
    created = f"  (created {info['created']})" if info.get("created") else ""
    print(f"{info['name']} {info['version']}{created}")
    src = info["source"]
    print(f"source: {src['kind']} {src['id']} @ {src['revision']}")
    print(f"embedding dimension {info['embedding_dimension']}, max_seq_length {info['max_seq_length']}")
    if bundle.head.prompts:
        print(f"prompts: {', '.join(bundle.head.prompts)} (default: {bundle.head.default_prompt_name})")
    print(f"selected here: {info['selected']['variant']} on {info['selected']['device']}")
    print(f"CPU: {describe_cpu(info['cpu'])}; {info['cpu']['why']}")
    print("variants (best first):")
    for v in info["variants"]:
        state = f"runs here on {v['device']}" if v["runs_here"] else f"not used: {v['why_not']}"
        print(f"  {v['name']:<14} {v['backend']:<12} {v['precision']:<5} {v['file']:<32} {state}")
        if v["gpu_note"] and (v["precision"] == "fp16" or not v["runs_here"]):
            print(f"  {'':<14} {v['gpu_note']}")
    trt = info.get("tensorrt_build") or {}
    if info["tensorrt_targets"]:
        print("TensorRT plans (one per GPU target):")
        for t in info["tensorrt_targets"]:
            if t["would_run_here"]:
                state = "would run here"
            else:  # a plan, and why not here; or no plan: "not built: why"
                state = f"not here: {t['why_not']}" if t["plan"] else t["why_not"]
            print(f"  {t['target']:<8} {sm(t['compute_capability']):<6} {t['plan'] or '-':<16} {state}")
    elif trt.get("skipped"):  # a bundle from before GPU targets
        print(f"TensorRT plans: none, build_trt skipped: {trt.get('reason')}")
    ov_build = info.get("openvino_build") or {}
    if ov_build.get("skipped"):
        print(f"OpenVINO variants: none, convert_openvino skipped: {ov_build.get('reason')}")
    published = info.get("published")
    if published:
        print(f"published: {published.get('name')}@{published.get('version')} (archive sha256 "
              f"{published.get('archive_sha256')}, commit {str(published.get('commit'))[:12]})")
        for line in changelog_lines(published.get("changelog")):
            print("  " + line)
    if info["verify"]:
        print("verify report (sealed release):")
        for name, m in info["verify"].get("variants", {}).items():
            print(f"  {name:<14} on {m['device']}: min cos {m['min_cosine']:.6f}  "
                  f"{'passed' if m['passed'] is True else 'FAILED'}")


def changelog_lines(changelog: dict | None) -> list[str]:
    """The comparison with the previous published version, as `stages.publish` recorded it."""
    if not changelog:
        return []
    previous = changelog.get("previous")
    if not previous:
        return ["changelog: first published version"]
    lines = [f"changelog against {previous}: {changelog.get('verdict', '')}"]
    for name, v in (changelog.get("variants") or {}).items():
        lines.append(f"  {name:<14} min cos {v.get('min_cosine', float('nan')):.6f}  mean cos "
                     f"{v.get('mean_cosine', float('nan')):.6f}  speed x{v.get('speed_ratio', float('nan')):.2f}")
    for key in ("params_sha256", "tools"):
        change = changelog.get(key) or {}
        if change.get("before") != change.get("after"):
            lines.append(f"  {key} changed")
    return lines


def _pull(args) -> None:
    from .registry import pull

    published, out = pull(args.repo, args.ref, Path(args.output or args.ref.replace("@", "-").replace("#", "-")))
    try:
        bundle = Bundle.load(out)  # checks every file (and the sealed report) before it needs a backend
        runs = f"runs here: variant {bundle.variant} on {bundle.device}"
    except InstallError as e:  # pulled, checked and unpacked: only a backend is missing on this machine
        runs = f"no backend to run it here yet: {e}"
    print(f"pulled {published.name} {published.version} into {out}")
    print(f"archive sha256 {published.sha256} (checked against the version tag); every file checked against "
          "manifest.json")
    print(runs)
    for line in changelog_lines(published.changelog):
        print(line)


def _list(args) -> None:
    from .registry import list_registry

    registry = list_registry(args.repo)
    if args.json:
        print(json.dumps(registry, indent=2))
        return
    if not registry:
        print(f"{args.repo}: no published versions")
    for name, entry in registry.items():
        stages = ", ".join(f"{s} -> {v}" for s, v in sorted(entry["stages"].items())) or "none"
        print(f"{name}  latest {entry['latest']}  versions {', '.join(entry['versions'])}  stages {stages}")


def _serve(args) -> int:
    try:
        from .serve.main import run
    except ImportError as e:
        raise ImportError(f"sbert-bundle serve needs the serve extra ({e.name or e} is missing): "
                          "pip install 'sbert-bundle[cpu,serve]'") from None
    return run(args)


def add_serve_parser(sub) -> None:
    srv = sub.add_parser(
        "serve", help="serve a bundle over HTTP (OpenAI- and TEI-compatible)",
        description="Serve BUNDLE (folder, .tar.gz or sealed release) or a published version (--pull) over HTTP: "
                    "POST /v1/embeddings (OpenAI), POST /embed and /tokenize (TEI), GET /v1/models, /info, /health, "
                    "/ready, /metrics. Inputs of concurrent requests are batched by padded tokens; each embedding "
                    "equals Bundle.encode's. Inputs cut by truncation are listed in the X-Truncated-Inputs header; "
                    "a request's \"truncate\": false refuses them. Needs: pip install 'sbert-bundle[cpu,serve]'.",
        epilog="SIGTERM drains: /ready and new requests answer 503, requests in flight finish (up to "
               "--drain-timeout), then exit 0. API keys: --api-key (repeatable), SBERT_BUNDLE_API_KEYS "
               "(comma-separated) or --api-key-file (one per line); /health and /ready stay open.")
    srv.add_argument("bundle", nargs="?", help="bundle folder, .tar.gz or release folder")
    srv.add_argument("--pull", nargs=2, metavar=("REPO", "REF"),
                     help="pull NAME@vX.Y.Z (or NAME#STAGE) from the registry REPO, check it, then serve it")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    srv.add_argument("--variant", help="variant name from the manifest (default: best exact one that runs here)")
    srv.add_argument("--threads", type=int, help="onnxruntime threads per process (default: cores / workers)")
    srv.add_argument("--device-id", type=int, default=0, help="CUDA device for GPU variants (default 0)")
    srv.add_argument("--workers", type=int, default=1, help="processes, each with its own session, on one port (default 1)")
    srv.add_argument("--api-key", action="append", help="accepted API key (repeatable)")
    srv.add_argument("--api-key-file", help="file with one accepted API key per line")
    srv.add_argument("--public-metrics", action="store_true", help="serve /metrics without the API key")
    srv.add_argument("--max-inputs", type=int, default=2048, help="inputs per request (default 2048, as OpenAI)")
    srv.add_argument("--max-input-tokens", type=int, help="tokens per input (default: the model's max_seq_length)")
    srv.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024, help="request body size in bytes (default 2 MiB; 413 past it)")
    srv.add_argument("--max-queue-tokens", type=int, default=262_144,
                     help="tokens waiting or running (default 262144); past it, 429 with Retry-After")
    srv.add_argument("--max-batch-tokens", type=int,
                     help="padded tokens per batch (default: the bundle's cpu_max_batch_tokens on CPU)")
    srv.add_argument("--max-batch-size", type=int, default=256, help="inputs per batch (default 256)")
    srv.add_argument("--no-truncate", action="store_true",
                     help="refuse inputs longer than the model takes unless a request says \"truncate\": true")
    srv.add_argument("--served-model-name", action="append", help="another name clients may give as `model`")
    srv.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM (default 30)")
    srv.add_argument("--access-log", action="store_true", help="log each request's method, path and status "
                                                                "(never its texts)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                     help="uvicorn's and the server's log level (default info)")
    srv.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sbert-bundle", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log which variant is picked and why")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser("encode", help="embed sentences, one per line, from a file or stdin")
    enc.add_argument("bundle", help="bundle folder or .tar.gz")
    enc.add_argument("-i", "--input", default="-", help="text file, one sentence per line (default: stdin)")
    enc.add_argument("-o", "--output", help="FILE.npy for a float32 array, else JSON lines (default: stdout)")
    enc.add_argument("--variant", help="variant name from the manifest (default: best that runs here)")
    enc.add_argument("--batch-size", type=int, default=32)
    enc.add_argument("--threads", type=int, help="onnxruntime intra-op threads on CPU (1 to the number of cores)")
    enc.add_argument("--device-id", type=int, default=0, help="CUDA device for GPU variants (default 0)")
    enc.add_argument("--prompt", help="text prepended to every sentence (wins over --prompt-name)")
    enc.add_argument("--prompt-name", help="one of the model's prompts (`inspect` lists them; default: the "
                                           "model's default_prompt_name, if it has one)")
    enc.set_defaults(func=_encode)

    ins = sub.add_parser("inspect", help="manifest, variants, which one runs here and why")
    ins.add_argument("bundle", help="bundle folder or .tar.gz")
    ins.add_argument("--variant", help="show the choice for this variant instead of the best")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--device-id", type=int, default=0, help="CUDA device for GPU variants (default 0)")
    ins.set_defaults(func=_inspect)

    pul = sub.add_parser("pull", help="download a published version from a registry, check it and unpack it",
                         description="Download NAME@VERSION (or NAME#STAGE, or NAME for the latest) from the "
                                     "registry REPO (a git URL or path: its version tags and DVC remote), check "
                                     "the archive's sha256 against the tag and every file against manifest.json. "
                                     "Needs: pip install 'sbert-bundle[registry]'.")
    pul.add_argument("repo", help="registry repository: git URL or local path")
    pul.add_argument("ref", help="NAME@vX.Y.Z, NAME#STAGE or NAME (latest)")
    pul.add_argument("-o", "--output", help="new folder to unpack into (default: NAME-VERSION)")
    pul.set_defaults(func=_pull)

    lst = sub.add_parser("list", help="published models, their versions and stages",
                         description="Each model in the registry REPO with its versions (newest first) and stages.")
    lst.add_argument("repo", help="registry repository: git URL or local path")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_list)

    add_serve_parser(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)
    except (IntegrityError, VariantError, HeadError, BackendError, NonFiniteError, OSError, EOFError,
            tarfile.TarError, ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"sbert-bundle: error: {e}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
