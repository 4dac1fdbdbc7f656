"""Compose conf/ (Hydra) into params.yaml, as `dvc exp run` does; overrides as arguments.

    python -m stages.compose                      # defaults
    python -m stages.compose model=mpnet_base     # then: dvc repro
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .common import PARAMS_FILE, REPO


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return OmegaConf.to_container(hydra_compose(config_name="config", overrides=overrides), resolve=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mpnet_base verify.batch_size=64")
    parser.add_argument("--out", type=Path, default=PARAMS_FILE, help="default: params.yaml")
    args = parser.parse_args()
    args.out.write_text(yaml.safe_dump(compose(args.overrides), sort_keys=False, allow_unicode=True))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
