"""Every bad input gives one clear StageError naming the file or value, and leaves nothing half-written.

Each case copies a tiny valid model, breaks the copy in one way, runs the stage's `run(...)`
inside `atomic_dir` exactly as the stage's `main()` does, and checks the message and that
neither the output folder nor a hidden `.<name>.tmp-*` folder is left behind.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, fast_params, make_st_model
from stages import export_onnx, fetch, split
from stages.common import StageError, atomic_dir

TANH = "torch.nn.modules.activation.Tanh"
UNSUPPORTED_TYPE = "foo.Bar"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory) -> Path:
    """Transformer + Pooling + Dense(tanh) + Normalize: one of each module type."""
    return make_st_model(tmp_path_factory.mktemp("bad-input") / "model", dense=[(16, TANH, True)])


@pytest.fixture(scope="module")
def good_split(tmp_path_factory, good_model) -> Path:
    out = tmp_path_factory.mktemp("bad-input-split") / "split"
    with atomic_dir(out) as tmp:
        split.run(good_model, tmp)
    return out


@pytest.fixture
def model(tmp_path, good_model) -> Path:
    """A private copy of the good model, to be broken by the test."""
    return Path(shutil.copytree(good_model, tmp_path / "model"))


def edit_modules(model: Path, index: int, **changes) -> None:
    path = model / "modules.json"
    entries = json.loads(path.read_text())
    entries[index].update(changes)
    path.write_text(json.dumps(entries, indent=2))


def assert_nothing_left(artifacts: Path, out_name: str) -> None:
    assert not (artifacts / out_name).exists(), f"{out_name} was written although the stage failed"
    leftovers = sorted(p.name for p in artifacts.glob(".*.tmp-*")) if artifacts.exists() else []
    assert leftovers == [], f"temporary folders left behind: {leftovers}"


def fails(tmp_path: Path, out_name: str, body, match: str) -> str:
    """Run body(tmp_out) inside atomic_dir(artifacts/out_name); it must raise StageError matching `match`."""
    artifacts = tmp_path / "artifacts"
    with pytest.raises(StageError, match=match) as info:
        with atomic_dir(artifacts / out_name) as tmp:
            body(tmp)
    assert_nothing_left(artifacts, out_name)
    return str(info.value)


def run_split(model: Path):
    return lambda out: split.run(model, out)


# --- split: modules.json ---------------------------------------------------------------------------------

def test_missing_modules_json_names_the_file(tmp_path, model):
    (model / "modules.json").unlink()
    msg = fails(tmp_path, "split", run_split(model), "modules.json")
    assert str(model / "modules.json") in msg and "not found" in msg


def test_corrupt_modules_json_is_reported_as_invalid_json(tmp_path, model):
    (model / "modules.json").write_text('[{"idx": 0, "path": "", ')  # truncated, as after a bad copy
    msg = fails(tmp_path, "split", run_split(model), "not valid JSON")
    assert str(model / "modules.json") in msg


def test_unsupported_module_type_names_entry_type_and_supported_types(tmp_path, model):
    edit_modules(model, 1, type=UNSUPPORTED_TYPE)
    msg = fails(tmp_path, "split", run_split(model), re.escape(f"{UNSUPPORTED_TYPE!r}"))
    assert str(model / "modules.json") in msg
    assert "entry 1" in msg
    assert "supported: Transformer, Pooling, Dense, Normalize" in msg


@pytest.mark.parametrize("bad_path", ["../outside", "1_Pooling/../../outside", "/etc"])
def test_module_path_outside_the_model_folder_is_refused(tmp_path, model, bad_path):
    outside = tmp_path / "outside"  # a real folder there, so only the check can stop it
    shutil.copytree(model / "1_Pooling", outside)
    edit_modules(model, 1, path=bad_path)
    msg = fails(tmp_path, "split", run_split(model), "leaves the model folder")
    assert "entry 1" in msg and repr(bad_path) in msg


# --- split: the Transformer module -----------------------------------------------------------------------

def test_missing_transformer_weights(tmp_path, model):
    (model / "model.safetensors").unlink()
    msg = fails(tmp_path, "split", run_split(model), "no weights")
    assert str(model) in msg and "model.safetensors" in msg


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def test_missing_tokenizer_files(tmp_path, model):
    removed = [f for f in TOKENIZER_FILES if (model / f).is_file()]
    assert removed, "the tiny model should have tokenizer files to remove"
    for f in removed:
        (model / f).unlink()
    msg = fails(tmp_path, "split", run_split(model), "tokenizer files missing")
    assert str(model) in msg


# --- split: head modules ---------------------------------------------------------------------------------

def test_unsupported_dense_activation_names_it_and_the_supported_ones(tmp_path, model):
    cfg_path = model / "2_Dense" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["activation_function"] == TANH
    cfg["activation_function"] = "torch.nn.modules.activation.Softplus"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    msg = fails(tmp_path, "split", run_split(model), re.escape("'torch.nn.modules.activation.Softplus'"))
    assert str(cfg_path) in msg and "supported:" in msg
    for name in ("torch.nn.modules.linear.Identity", TANH, "torch.nn.modules.activation.ReLU",
                 "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.activation.GELU"):
        assert name in msg


# --- export_onnx -----------------------------------------------------------------------------------------

def test_unexportable_model_says_cannot_export(tmp_path, good_split, params):
    cfg = copy.deepcopy(fast_params(params)["export"])
    cfg["opset"] = 7  # BERT's dynamic slices need opset >= 10; the TorchScript exporter refuses
    msg = fails(tmp_path, "onnx", lambda out: export_onnx.run(cfg, good_split, out), "cannot export")
    assert len(msg) < 2000, "the message should be the cause, not a graph dump"
    first_line = msg.splitlines()[0]
    assert "BertModel" in first_line and str(good_split / "transformer") in first_line
    assert "opset" in first_line  # the exporter's own hint: "export to a higher opset version"


# --- fetch -----------------------------------------------------------------------------------------------

def test_unknown_source_kind_lists_supported_kinds(tmp_path):
    msg = fails(tmp_path, "source", lambda out: fetch.run({"kind": "nope"}, [], out), "'nope'")
    assert "supported: package, local, hub, pypi_parts" in msg


def test_local_source_that_does_not_exist_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    fails(tmp_path, "source", lambda out: fetch.run({"kind": "local", "path": str(missing)}, [], out),
          re.escape(str(missing)))


@pytest.mark.parametrize("revision", ["main", "v1.0", "1a2b3c4", None])
def test_hub_revision_must_be_a_pinned_commit(tmp_path, revision):
    src = {"kind": "hub", "repo_id": "org/tiny", "revision": revision, "offline": True,
           "cache_dir": str(tmp_path / "hf-cache")}
    msg = fails(tmp_path, "source", lambda out: fetch.run(src, [], out), "not a commit sha")
    assert "pin the 40-hex commit" in msg
    if revision:
        assert repr(revision) in msg


# --- the real command line -------------------------------------------------------------------------------

def test_split_command_line_exits_1_with_one_error_line_and_writes_nothing(tmp_path, model):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy2(REPO / "params.yaml", work / "params.yaml")
    edit_modules(model, 1, type=UNSUPPORTED_TYPE)
    shutil.copytree(model, work / "artifacts" / "minilm_l6" / "source" / "model")  # the default model's folder
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "stages.split"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "entry 1" in errors[0] and repr(UNSUPPORTED_TYPE) in errors[0]
    assert "artifacts/minilm_l6/source/model/modules.json" in errors[0]
    assert_nothing_left(work / "artifacts" / "minilm_l6", "split")


# --- split: what sbert_bundle cannot reproduce is refused, not silently changed -------------------------

def test_default_prompt_that_is_not_a_prompt_is_refused(tmp_path, model):
    """A default prompt is carried into the bundle (tests/test_model_zoo.py); one naming no prompt is not."""
    cfg_path = model / "config_sentence_transformers.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg.update(prompts={"query": "query: "}, default_prompt_name="passage")
    cfg_path.write_text(json.dumps(cfg))
    msg = fails(tmp_path, "split", run_split(model), "default_prompt_name 'passage' is not one of its prompts")
    assert str(cfg_path) in msg


def test_dense_with_residual_is_refused(tmp_path, model):
    cfg_path = model / "2_Dense" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_residual"] = True
    cfg_path.write_text(json.dumps(cfg))
    msg = fails(tmp_path, "split", run_split(model), "use_residual")
    assert str(cfg_path) in msg


def test_normalize_before_pooling_is_refused(tmp_path, model):
    entries = json.loads((model / "modules.json").read_text())
    entries[1], entries[-1] = entries[-1], entries[1]
    (model / "modules.json").write_text(json.dumps(entries))
    fails(tmp_path, "split", run_split(model), r"expected Transformer, then Pooling")
