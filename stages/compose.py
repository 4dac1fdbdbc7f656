"""Compose conf/ (Hydra) into params.yaml, as `dvc exp run` does; overrides as arguments.

    python -m stages.compose                                  # defaults
    python -m stages.compose 'model=[minilm_l6,mpnet_base]'    # then: dvc repro

Also writes dvc.yaml's `artifacts:` (one registry entry per model: DVC has no foreach there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .common import PARAMS_FILE, REPO, StageError, model_dir, model_keys, model_params

DVC_FILE = Path("dvc.yaml")
ARTIFACT_DESC = "sentence-transformers model as a verified ONNX Runtime / TensorRT bundle (sbert-bundle)"
ARTIFACT_LABELS = ["sentence-embeddings", "onnx", "sbert-bundle"]


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)


def release_path(key: str, model: dict) -> str:
    """The release archive of one model (what the release stage writes), relative to the repository."""
    return (model_dir(key) / "release" / f"{model['name']}-{model['version']}.tar.gz").as_posix()


def artifact_entries(params: dict) -> dict:
    """dvc.yaml's `artifacts:` for params: one model artifact per model, named after model.<key>.name."""
    entries, owner = {}, {}
    for key in model_keys(params):
        p = model_params(params, key)
        name = p["model"]["name"]
        if name in owner:
            raise StageError(f"models {owner[name]} and {key} have the same name {name!r}: each model's "
                             "registry name (model.<key>.name) must be its own")
        owner[name] = key
        entries[name] = {"path": release_path(key, p["model"]), "type": "model", "desc": ARTIFACT_DESC,
                         "labels": ARTIFACT_LABELS,
                         "meta": {"model": key, "source": p["model"]["source"]["kind"],
                                  "embedding_dimension": p["model"]["embedding_dimension"],
                                  "variants": p["package"]["variants"], "gates": p["verify"]["gates"]}}
    return entries


def with_artifacts(dvc_text: str, params: dict) -> str:
    """dvc.yaml's text with its `artifacts:` section (the last one of the file) made from params."""
    head = dvc_text.split("\nartifacts:\n", 1)[0].rstrip("\n") + "\n"
    block = yaml.safe_dump({"artifacts": artifact_entries(params)}, sort_keys=False, allow_unicode=True,
                           default_flow_style=None, width=120)
    return head + block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. 'model=[minilm_l6,mpnet_base]' "
                                                     "verify.batch_size=64")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE, help="default: params.yaml")
    parser.add_argument("--dvc-file", type=Path, default=DVC_FILE, help="default: dvc.yaml (its artifacts: section)")
    args = parser.parse_args()
    params = compose(args.overrides)
    args.out.write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    print(f"wrote {args.out}")
    args.dvc_file.write_text(with_artifacts(args.dvc_file.read_text(), params))
    print(f"wrote the artifacts: section of {args.dvc_file} ({', '.join(artifact_entries(params))})")


if __name__ == "__main__":
    main()
