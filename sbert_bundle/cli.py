"""`sbert-bundle` command line: encode a corpus, inspect a bundle, pull, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tarfile
from pathlib import Path


from .backends import BackendError, InstallError
from .bundle import Bundle, NonFiniteError, VariantError
from .cpu import describe_cpu
from .head import HeadError
from .manifest import IntegrityError, check_threads
from .trt import sm


def _encode(args) -> None:
    from .corpus.job import Settings, run

    if args.threads is not None:
        check_threads(args.threads, "--threads")
    run(args.bundle, Settings(
        input=args.input, output=args.output, input_format=args.input_format, column=args.field or args.column,
        keep=args.keep or [], dtype=args.dtype, on_invalid=args.on_invalid, chunk_rows=args.chunk_rows,
        batch_size=args.batch_size, prompt=args.prompt, prompt_name=args.prompt_name, variant=args.variant,
        threads=args.threads, workers=args.workers, resume=args.resume, quiet=args.quiet, device_id=args.device_id))


def _ray_encode(args) -> None:
    from .corpus.ray_data import run_cli

    run_cli(args)


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


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: `main` parses with it, and the docs' CLI reference is rendered from it."""
    parser = argparse.ArgumentParser(prog="sbert-bundle", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log which variant is picked and why")
    sub = parser.add_subparsers(dest="command", required=True)

    enc = sub.add_parser(
        "encode", help="embed a corpus of any size: text, JSON lines, CSV or Parquet in; .npy, Parquet or JSON lines out",
        description="Embed INPUT with BUNDLE in chunks: memory stays bounded whatever the corpus size, a progress "
                    "bar (or, off a terminal, a log line every 10 s) shows rows, rows/s and ETA, and the output is "
                    "committed chunk by chunk, so --resume goes on after a kill. Embeddings are "
                    "Bundle.encode's, computed chunk by chunk. CSV and Parquet need: pip install 'sbert-bundle[corpus]'.",
        epilog="Input format from INPUT's name: .jsonl/.ndjson (each line a JSON string, or an object and --field), "
               ".csv and .parquet (--column), anything else text, one sentence per line (also stdin). Output format "
               "from -o's name: .npy (float32 or --dtype float16), .parquet (id = input row, embedding as a "
               "fixed-size list, --keep columns), .jsonl; without -o, JSON lines on stdout. While it runs the data "
               "sits in OUT.partial (OUT.parts/ for Parquet) beside OUT.progress.json; OUT appears when it is "
               "complete. Rows that are null or not text are refused, naming the row; --on-invalid skip (or "
               "empty) goes on and lists them in OUT.skipped.jsonl.")
    enc.add_argument("bundle", help="bundle folder or .tar.gz")
    enc.add_argument("-i", "--input", default="-", help="input file (default: stdin, text lines)")
    enc.add_argument("-o", "--output", help="FILE.npy, FILE.parquet or FILE.jsonl (default: JSON lines on stdout)")
    enc.add_argument("--input-format", choices=["text", "jsonl", "csv", "parquet"],
                     help="override the format the input's name gives")
    enc.add_argument("--field", help="JSON lines: the field holding the text")
    enc.add_argument("--column", help="CSV / Parquet: the column holding the text")
    enc.add_argument("--keep", nargs="+", metavar="COLUMN", help="input columns copied into a Parquet output")
    enc.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                     help="stored precision of .npy / Parquet output (default float32; computed in float32)")
    enc.add_argument("--on-invalid", choices=["error", "skip", "empty"], default="error",
                     help="a null or non-text row: error (default), skip it, or embed an empty string; "
                          "skip and empty list the rows in OUT.skipped.jsonl")
    enc.add_argument("--resume", action="store_true", help="go on from the last committed chunk of an interrupted "
                                                          "run with the same bundle, input and settings")
    enc.add_argument("--workers", default="1",
                     help="processes, each with its own session and a share of the cores (default 1); auto: the "
                          "split measured fastest, one process on every core (docs/corpus.md)")
    enc.add_argument("--chunk-rows", type=int, default=8192, help="rows read, encoded and committed at a time "
                                                                  "(default 8192)")
    enc.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    enc.add_argument("--variant", help="variant name from the manifest (default: best that runs here)")
    enc.add_argument("--batch-size", type=int, default=32, help="sentences per batch at most (default 32)")
    enc.add_argument("--threads", type=int, help="intra-op threads per worker (default: cores / workers)")
    enc.add_argument("--device-id", type=int, default=0, help="CUDA device for GPU variants (default 0)")
    enc.add_argument("--prompt", help="text prepended to every sentence (wins over --prompt-name)")
    enc.add_argument("--prompt-name", help="one of the model's prompts (`inspect` lists them; default: the "
                                           "model's default_prompt_name, if it has one)")
    enc.set_defaults(func=_encode)

    ray = sub.add_parser(
        "ray-encode", help="embed a Parquet dataset on a Ray cluster (Ray Data), writing Parquet shards",
        description="Read Parquet from INPUT (a path every node sees, or s3://...), embed its --column with BUNDLE "
                    "(a path every node sees) in actors that load the bundle once each, and write Parquet shards "
                    "to OUTPUT: the input's columns plus `embedding`. Connects to RAY_ADDRESS, else starts a local "
                    "Ray. Needs: pip install 'sbert-bundle[cpu,corpus,cluster]'.")
    ray.add_argument("bundle", help="bundle folder or .tar.gz, at the same path on every node")
    ray.add_argument("input", help="Parquet file or folder (or s3://bucket/prefix)")
    ray.add_argument("output", help="folder for the Parquet shards (or s3://...)")
    ray.add_argument("--column", required=True, help="the column holding the text")
    ray.add_argument("--variant", help="variant name (default: the one Bundle.load picks on the driver, so every "
                                       "node runs the same one)")
    ray.add_argument("--concurrency", type=int, default=None,
                     help="actors (default: the cluster's CPUs / --num-cpus, less one; actors on every CPU leave "
                          "none for reading and writing, and the job stalls)")
    ray.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor (default 1; also its threads)")
    ray.add_argument("--batch-rows", type=int, default=4096, help="rows per map_batches call (default 4096)")
    ray.add_argument("--on-invalid", choices=["error", "skip", "empty"], default="error",
                     help="a null or non-text row: error (default), drop the row, or embed an empty string")
    ray.set_defaults(func=_ray_encode)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)
    except BrokenPipeError:  # `... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (IntegrityError, VariantError, HeadError, BackendError, NonFiniteError, OSError, EOFError,
            tarfile.TarError, ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"sbert-bundle: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sbert-bundle: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
