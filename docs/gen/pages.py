"""mkdocs-gen-files script (mkdocs.yml `plugins: gen-files`): the pages generated at build time.

- reference/cli.md      from sbert_bundle.cli.build_parser() (cli_reference.render_cli)
- reference/stages.md   `python -m stages.<name> --help` of every stage module (cli_reference.render_stages)
- reference/params.md   from params.yaml and the comments of conf/ (params_reference.render_params)
- every page with a `<!-- bench: FILE -->` marker gets FILE's tables in its place, and benchmarks.md's
  `<!-- bench: every file -->` marker gets every file of benchmarks/results/ (benchmarks.py).

The generators are plain modules beside this one, so that tests/test_docs.py can call them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import mkdocs_gen_files

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOCS = REPO / "docs"
ALL_RESULTS = "<!-- bench: every file -->"


def load(name: str):
    """A generator module, loaded afresh on every build (so that `make docs-serve` picks up edits)."""
    spec = importlib.util.spec_from_file_location(f"docs_gen_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from sbert_bundle.cli import build_parser  # noqa: E402

cli_reference, params_reference, benchmarks = load("cli_reference"), load("params_reference"), load("benchmarks")

with mkdocs_gen_files.open("reference/cli.md", "w") as f:
    f.write(cli_reference.render_cli(build_parser()))

with mkdocs_gen_files.open("reference/stages.md", "w") as f:
    f.write(cli_reference.render_stages())

with mkdocs_gen_files.open("reference/params.md", "w") as f:
    f.write(params_reference.render_params())

for path in sorted(DOCS.rglob("*.md")):
    page = path.relative_to(DOCS).as_posix()
    text = path.read_text(encoding="utf-8")
    expanded = benchmarks.expand_markers(text, page)
    if page == "benchmarks.md":
        if ALL_RESULTS not in expanded:
            raise SystemExit(f"docs/benchmarks.md lost its marker {ALL_RESULTS}: the results would not be rendered")
        expanded = expanded.replace(ALL_RESULTS, benchmarks.render_all())
    if expanded != text:
        with mkdocs_gen_files.open(page, "w") as f:
            f.write(expanded)
