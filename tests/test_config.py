"""conf/ (Hydra) -> params.yaml -> dvc.yaml stay consistent."""

import importlib
import re
from pathlib import Path

import pytest
import yaml
from stages.compose import compose

REPO = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def composed(*overrides):
    return compose(list(overrides))


def test_params_yaml_is_the_composition_of_conf(params):
    assert composed() == params, "params.yaml is stale: run `python -m stages.compose`"


@pytest.mark.parametrize("model", ["minilm_l6", "mpnet_base", "local", "hub"])
def test_every_model_option_composes(model):
    cfg = composed(f"model={model}")
    assert cfg["model"]["source"]["kind"] in {"package", "pypi_parts", "local", "hub"}
    assert re.match(r"^\d+\.\d+\.\d+$", cfg["model"]["version"])


def test_no_machine_specific_interpolations():
    for path in (REPO / "conf").rglob("*.yaml"):
        text = path.read_text()
        assert "${hydra:" not in text and "${oc.env:" not in text, path


def _lookup(params, dotted):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def resolve(path: str, params: dict) -> str:
    """dvc.yaml's ${a.b} templates, filled from params.yaml as DVC does."""
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), path)


@pytest.mark.parametrize("name", list(DVC["stages"]))
def test_stage_lists_its_module_and_real_params(name, params):
    stage = DVC["stages"][name]
    module = re.match(r"python -m (stages\.\w+)$", stage["cmd"]).group(1)
    importlib.import_module(module)  # the command names a real module
    assert module.replace(".", "/") + ".py" in stage["deps"]
    for key in stage.get("params", []):
        _lookup(params, key)  # KeyError if the stage lists a key params.yaml lacks
    for dep in stage["deps"]:
        assert (REPO / resolve(dep, params)).exists() or resolve(dep, params).startswith("artifacts/"), dep
    for out in stage.get("outs", []):
        out = resolve(next(iter(out)) if isinstance(out, dict) else out, params)
        assert out.startswith("artifacts/"), f"{name} writes {out} outside artifacts/"


def test_only_verify_reads_verify_params():
    readers = [n for n, s in DVC["stages"].items() if any(p.split(".")[0] == "verify" for p in s.get("params", []))]
    assert readers == ["verify"]


def test_hydra_composition_enabled_for_dvc():
    config = (REPO / ".dvc" / "config").read_text()
    assert re.search(r"\[hydra\][^\[]*enabled\s*=\s*true", config)
