"""conf/ (Hydra) -> params.yaml -> dvc.yaml stay consistent."""

import importlib
import re
from pathlib import Path

import pytest
import yaml
from stages.common import STAGE_SECTIONS, StageError, model_params, pick_model
from stages.compose import artifact_entries, compose, release_path, with_artifacts

REPO = Path(__file__).resolve().parent.parent
DVC_TEXT = (REPO / "dvc.yaml").read_text()
DVC = yaml.safe_load(DVC_TEXT)
MODEL_FILES = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


def composed(*overrides):
    return compose(list(overrides))


def test_params_yaml_is_the_composition_of_conf(raw_params):
    assert composed() == raw_params, "params.yaml is stale: run `python -m stages.compose`"


def test_dvc_yaml_declares_one_registry_artifact_per_model(raw_params):
    assert with_artifacts(DVC_TEXT, raw_params) == DVC_TEXT, "dvc.yaml's artifacts: is stale: run `python -m stages.compose`"
    assert [a["meta"]["model"] for a in DVC["artifacts"].values()] == list(raw_params["model"])


def test_default_builds_only_the_default_model(raw_params):
    assert list(raw_params["model"]) == ["minilm_l6"]


@pytest.mark.parametrize("model", MODEL_FILES)
def test_every_model_option_composes(model):
    cfg = composed(f"model=[{model}]")
    assert list(cfg["model"]) == [model], f"conf/model/{model}.yaml must start with `# @package model.{model}`"
    entry = cfg["model"][model]
    assert entry["source"]["kind"] in {"package", "pypi_parts", "local", "hub"}
    assert re.match(r"^\d+\.\d+\.\d+$", entry["version"])
    assert set(entry["overrides"]) <= set(STAGE_SECTIONS)


def test_several_models_side_by_side_keep_their_own_overrides():
    cfg = composed("model=[minilm_l6,mpnet_base]")
    assert list(cfg["model"]) == ["minilm_l6", "mpnet_base"]
    assert model_params(cfg, "mpnet_base")["quantize"]["method"] == "weight_only"
    assert model_params(cfg, "minilm_l6")["quantize"]["method"] == "dynamic"
    assert model_params(cfg, "mpnet_base")["quantize"]["source"] == cfg["quantize"]["source"]  # merged, not replaced
    assert model_params(cfg, "mpnet_base")["model"]["name"] == "all-mpnet-base-v2"
    assert "overrides" not in model_params(cfg, "mpnet_base")["model"]
    entries = artifact_entries(cfg)
    assert {n: e["path"] for n, e in entries.items()} == {
        "all-MiniLM-L6-v2": "artifacts/minilm_l6/release/all-MiniLM-L6-v2-1.0.0.tar.gz",
        "all-mpnet-base-v2": "artifacts/mpnet_base/release/all-mpnet-base-v2-1.0.0.tar.gz"}


def test_model_selection_errors_name_the_models():
    cfg = composed("model=[minilm_l6,mpnet_base]")
    with pytest.raises(StageError, match=r"builds 2 models \(minilm_l6, mpnet_base\): name one with --model"):
        pick_model(cfg, None)
    with pytest.raises(StageError, match=r"--model 'nope' is not in params.yaml's models: minilm_l6, mpnet_base"):
        pick_model(cfg, "nope")
    cfg["model"]["mpnet_base"]["overrides"] = {"modle": {}}
    with pytest.raises(StageError, match=r"model.mpnet_base.overrides names \['modle'\]"):
        model_params(cfg, "mpnet_base")
    cfg["model"]["mpnet_base"]["overrides"] = {}
    cfg["model"]["x"] = cfg["model"]["minilm_l6"]
    with pytest.raises(StageError, match="models minilm_l6 and x have the same name 'all-MiniLM-L6-v2'"):
        artifact_entries(cfg)


def test_no_machine_specific_interpolations():
    for path in (REPO / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "${hydra:" not in text and "${oc.env:" not in text, path


def _lookup(params, dotted):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve(path: str, params: dict, key: str) -> str:
    """dvc.yaml's ${key} and ${a.b} templates, filled from params.yaml as DVC does for one model's cell."""
    path = path.replace("${key}", key)
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), path)


PER_MODEL = [n for n in DVC["stages"] if n != "build_trt"]


def cell_body(name: str) -> dict:
    stage = DVC["stages"][name]
    return stage.get("do", stage)


@pytest.mark.parametrize("name", PER_MODEL)
def test_stage_is_one_cell_per_model_and_lists_its_module_and_real_params(name, raw_params):
    stage = DVC["stages"][name]
    assert stage.get("foreach") == "${model}", f"{name} must be one cell per model (foreach: ${{model}})"
    stage = stage["do"]
    module = re.match(r"python -m (stages\.\w+) --model \$\{key\}$", stage["cmd"]).group(1)
    importlib.import_module(module)  # the command names a real module
    assert module.replace(".", "/") + ".py" in stage["deps"]
    for key in raw_params["model"]:
        for param in stage.get("params", []):
            _lookup(raw_params, param.replace("${key}", key))  # KeyError if the stage lists a key params.yaml lacks
        for dep in stage["deps"]:
            dep = resolve(dep, raw_params, key)
            assert (REPO / dep).exists() or dep.startswith(f"artifacts/{key}/"), dep
        for out in stage.get("outs", []):
            out = resolve(next(iter(out)) if isinstance(out, dict) else out, raw_params, key)
            assert out.startswith(f"artifacts/{key}/"), f"{name}@{key} writes {out} outside artifacts/{key}/"


def test_build_trt_is_one_cell_per_model_and_gpu_target(raw_params):
    stage = DVC["stages"]["build_trt"]
    assert stage["matrix"] == {"model": "${model}", "target": "${trt.targets}"}
    assert stage["cmd"] == "python -m stages.build_trt --model ${item.model} --target ${item.target}"
    assert "stages/build_trt.py" in stage["deps"]
    assert raw_params["trt"]["targets"], "conf/trt names no GPU target"
    read = {p.split(".")[1] for p in stage["params"] if p.startswith("trt.")}
    assert read == set(raw_params["trt"]) - {"targets"} | {"targets"}, "build_trt must list every trt key it reads"
    for model in raw_params["model"]:
        for target in raw_params["trt"]["targets"]:
            fill = {"${item.model}": model, "${item.target}": target}
            for param in stage["params"]:
                for k, v in fill.items():
                    param = param.replace(k, v)
                _lookup(raw_params, param)
            (out,) = stage["outs"]
            for k, v in fill.items():
                out = out.replace(k, v)
            assert out == f"artifacts/{model}/trt/{target}"
    assert "artifacts/${key}/trt" in DVC["stages"]["package"]["do"]["deps"]  # every target's cell, through the folder


def test_cells_reading_an_overridable_section_depend_on_the_models_overrides():
    for name in DVC["stages"]:
        params = cell_body(name).get("params", [])
        if any(p.split(".")[0] in STAGE_SECTIONS for p in params) and not any(
                p in ("model.${key}", "model.${item.model}") for p in params):
            assert "model.${key}.overrides" in params or "model.${item.model}.overrides" in params, name


def test_release_path_is_the_release_stage_output(raw_params):
    key = next(iter(raw_params["model"]))
    outs = DVC["stages"]["release"]["do"]["outs"]
    assert release_path(key, model_params(raw_params, key)["model"]).startswith(resolve(outs[0], raw_params, key) + "/")


def test_only_verify_reads_verify_params():
    readers = [n for n in DVC["stages"] if any(p.split(".")[0] == "verify" for p in cell_body(n).get("params", []))]
    assert readers == ["verify"]


def test_hydra_composition_enabled_for_dvc():
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"\[hydra\][^\[]*enabled\s*=\s*true", config)
