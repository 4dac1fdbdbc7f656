"""What every stage shares: params, logging, atomic outputs, one way to fail."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePath
from typing import Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path("artifacts")
PARAMS_FILE = Path("params.yaml")

log = logging.getLogger("stages")


class StageError(RuntimeError):
    """A failure the user can act on; the message names the file or value at fault."""


def git(*args: str, cwd: Path = REPO) -> str:
    """git's standard output (as printed: porcelain formats keep their leading spaces); StageError on failure."""
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise StageError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")
    return done.stdout


def load_params(path: Path = PARAMS_FILE) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path} not found: run stages from the repository root") from None


# The sections of params.yaml that a model's `overrides` may change for that model only.
STAGE_SECTIONS = ("fetch", "export", "fp16", "quantize", "openvino", "trt", "package", "verify", "publish")


def model_keys(params: dict) -> list[str]:
    """The models to build: the keys of params' `model` (one per entry of conf/model chosen in conf/config.yaml)."""
    models = params.get("model")
    if not isinstance(models, dict) or not models or not all(isinstance(v, dict) for v in models.values()):
        raise StageError("params.yaml `model` must map each model to build to its settings (conf/config.yaml's "
                         "defaults list `- model: [minilm_l6, ...]`); recompose it with `python -m stages.compose`")
    return list(models)


def pick_model(params: dict, key: str | None) -> str:
    """key, checked against the models of params; None is the only model (an error naming them if several)."""
    keys = model_keys(params)
    if key is None:
        if len(keys) > 1:
            raise StageError(f"params.yaml builds {len(keys)} models ({', '.join(keys)}): name one with --model")
        return keys[0]
    if key not in keys:
        raise StageError(f"--model {key!r} is not in params.yaml's models: {', '.join(keys)}")
    return key


def _merged(base, override):
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merged(base.get(k), v) if k in base else v
        return out
    return override


def model_params(params: dict, key: str | None = None) -> dict:
    """The params of one model, shaped as one build reads them: `model` is that model's entry (without its
    overrides), and each stage section is the shared one with the model's `overrides` merged in."""
    key = pick_model(params, key)
    entry = dict(params["model"][key])
    overrides = entry.pop("overrides", None)
    if not isinstance(overrides, dict):
        raise StageError(f"params.yaml model.{key} has no `overrides` mapping (conf/model/{key}.yaml needs "
                         "`overrides: {}` when it overrides nothing)")
    unknown = sorted(set(overrides) - set(STAGE_SECTIONS))
    if unknown:
        raise StageError(f"model.{key}.overrides names {unknown}; a model may override {list(STAGE_SECTIONS)}")
    out = {k: v for k, v in params.items() if k != "model"}
    for section, value in overrides.items():
        out[section] = _merged(params.get(section), value)
    out["model"] = entry
    return out


def model_dir(key: str) -> Path:
    """Where one model's stages write: artifacts/<model>/."""
    return ARTIFACTS / key


def load_model(args: argparse.Namespace) -> tuple[str, dict, Path]:
    """(model key, that model's params, its artifacts folder) for a stage's --params / --model."""
    raw = load_params(args.params)
    key = pick_model(raw, args.model)
    return key, model_params(raw, key), model_dir(key)


def stage_environment() -> dict:
    """This environment's python and dvc first on PATH, for stage commands run in another clone
    (rebuild_check, matrix workers); offline unless HF_HUB_OFFLINE says otherwise."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def row_cosines(a, b):
    """Cosine similarity of each row of a with the same row of b (sentence embeddings)."""
    import numpy as np

    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


# Threads of every computation whose result is written to disk (validation figures,
# calibration statistics, parity): one, so that outputs do not depend on the core count.
OUTPUT_THREADS = 1


def cpu_session(model):
    """onnxruntime CPU session (model: path or serialized bytes) on OUTPUT_THREADS threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = OUTPUT_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def torch_threads(n: int = OUTPUT_THREADS) -> Iterator[None]:
    """torch on n intra-op threads inside the block; the previous count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _json_default(value):
    """numpy scalars and arrays as numbers and lists, sets sorted, paths in POSIX form, else str."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, PurePath):
        return value.as_posix()
    return str(value)


def write_json(path: Path, data) -> None:
    """The same data gives the same bytes: keys sorted, floats in Python's shortest round-trip
    form, UTF-8 whatever the locale, LF line ends."""
    text = json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True, default=_json_default) + "\n"
    Path(path).write_bytes(text.encode("utf-8"))


MEASURED = "measured"


def write_measured(art: Path, stage: str, figures: dict) -> Path:
    """What a stage measured on this machine (max |diff| against PyTorch, cosines against fp32) to
    artifacts/measured/<model>/<stage>.json, beside the stage outputs and not one of them: such
    figures follow the CPU's instruction set, so a hashed output holds only the thresholds they
    passed (docs/reproducibility.md). `dvc metrics show` reads them (dvc.yaml's metrics)."""
    folder = Path(art).parent / MEASURED / Path(art).name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stage}.json"
    with atomic_file(target) as tmp:
        write_json(tmp, figures)
    return target


def read_json(path: Path, what: str = "file") -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{what} {path} not found") from None
    except json.JSONDecodeError as e:
        raise StageError(f"{what} {path} is not valid JSON: {e}") from None


def _lock(target: Path) -> int:
    """An exclusive lock on target (a `.<name>.lock` file beside it), released when the process ends."""
    path = target.parent / f".{target.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StageError(f"{target} is being written by another run of this stage (lock {path}); "
                         "wait for it to finish") from None
    return fd


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale(target: Path) -> list[Path]:
    """Temporaries of target left by a run that was killed (call only while holding target's lock)."""
    stale = sorted([*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")])
    for path in stale:
        log.info("removing %s, left by a run that did not finish", path)
        _remove(path)
    return stale


def swap_in(targets: list[Path], temps: list[Path]) -> None:
    """Old outputs aside, every new one in, then the old ones removed.

    A kill at any point leaves each target either absent or complete and new: never an old
    one half-deleted, never old and new outputs of one stage side by side. What was set
    aside is removed by the next run (`remove_stale`); an absent output makes DVC re-run."""
    aside = []
    for target in targets:
        if target.exists() or target.is_symlink():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
            os.replace(target, old)
            aside.append(old)
    for target, tmp in zip(targets, temps):
        os.replace(tmp, target)
    for old in aside:
        _remove(old)


@contextlib.contextmanager
def atomic_outputs(folders: list[Path] = (), files: list[Path] = ()) -> Iterator[list[Path]]:
    """Yield one temporary path per output (empty folders, then files), beside each output.

    Each output is locked for the whole block, so a second run of the same stage stops at
    once with a StageError instead of racing; temporaries of killed runs are removed first.
    On success every output is replaced together (`swap_in`); on failure the temporaries go."""
    folders, files = [Path(f) for f in folders], [Path(f) for f in files]
    targets = folders + files
    fds, temps = [], []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fds.append(_lock(target))
            remove_stale(target)
        for target in folders:
            temps.append(Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent)))
            temps[-1].chmod(0o755)  # mkdtemp makes 0700
        for target in files:
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
            os.close(fd)
            temps.append(Path(name))
            temps[-1].chmod(0o644)  # mkstemp makes 0600
        try:
            yield list(temps)
        except BaseException:
            for tmp in temps:
                _remove(tmp)
            raise
        swap_in(targets, temps)
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside target; it replaces target only on success."""
    with atomic_outputs(folders=[target]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside target; it replaces target only on success."""
    with atomic_outputs(files=[target]) as (tmp,):
        yield tmp


def progress_enabled() -> bool:
    return logging.getLogger().isEnabledFor(logging.INFO) and not os.environ.get("SBERT_BUNDLE_QUIET")


def stage_main(doc: str, body: Callable[[argparse.Namespace], None],
               add_args: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Parse --help/--quiet, set up logging, run body, turn expected failures into exit 1.

    doc: the stage module's docstring, shown by --help (what it reads, writes and why)."""
    module = sys.modules["__main__"].__spec__.name if sys.modules["__main__"].__spec__ else "stage"
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Settings come from the params file (composed from conf/; see docs/pipeline.md).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: params.yaml)")
    parser.add_argument("--model", help="which model of params.yaml (a key of its `model`; needed when it has several)")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quiet:
        os.environ["SBERT_BUNDLE_QUIET"] = "1"
    from sbert_bundle import BackendError, HeadError, IntegrityError, NonFiniteError, TokenizerError, VariantError

    try:
        body(args)
    except (StageError, IntegrityError, VariantError, HeadError, BackendError, NonFiniteError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
