"""The documentation's generated parts agree with the code and the results (cheap: no mkdocs build;
CI runs `make docs`, which builds the site with --strict)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from sbert_bundle.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
GEN = REPO / "docs" / "gen"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_gen_{name}", GEN / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_reference = _load("cli_reference")
params_reference = _load("params_reference")
benchmarks = _load("benchmarks")


def test_cli_reference_has_every_subcommand_and_option():
    parser = build_parser()
    page = cli_reference.render_cli(parser)
    subs = cli_reference.subcommands(parser)
    assert {"encode", "ray-encode", "inspect", "pull", "list", "serve"} <= set(subs)
    for name, (sub, _) in subs.items():
        assert f"## `sbert-bundle {name}` {{#{name}}}" in page, name
        section = page.split(f"## `sbert-bundle {name}`", 1)[1].split("\n## ", 1)[0]
        rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
        for action in sub._actions:
            if "-h" in action.option_strings:
                continue
            wanted = action.option_strings or [action.dest]
            for option in wanted:
                assert any(re.search(rf"[`, ]{re.escape(option)}[` ,]", row) for row in rows), \
                    f"{name}: {option} has no row in its arguments table"
            if action.help:  # its help text, as far as the first parenthesis
                shown = section.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
                assert " ".join(action.help.split()).split("(")[0].strip()[:30] in shown, f"{name}: {wanted[0]} help"


def test_stage_reference_covers_every_dvc_stage():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    modules = cli_reference.stage_modules()
    for stage, spec in dvc.items():
        cmd = (spec.get("do") or spec)["cmd"]
        module = re.search(r"python -m stages\.(\w+)", cmd).group(1)
        assert module in modules, f"dvc.yaml stage {stage} runs stages.{module}, missing from the reference"
    page = cli_reference.render_stages(["fetch"])
    assert "usage: python -m stages.fetch" in page and "--model MODEL" in page


def test_params_reference_has_every_key_of_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    page = params_reference.render_params()

    def paths(value, prefix):
        yield prefix
        if isinstance(value, dict):
            for key, sub in value.items():
                yield from paths(sub, f"{prefix}.{key}")

    for section, value in params.items():
        assert f"## `{section}` {{#{section}}}" in page
        for path in list(paths(value, section))[1:]:
            assert f"| `{path}` |" in page, f"{path} missing from the params.yaml reference"
    # a note from conf/ reaches its key
    assert "| `verify.min_speedup` | `null` | e.g. 1.2: fail when" in page


def test_every_result_file_is_rendered_with_its_record():
    files = benchmarks.result_files()
    assert files, "benchmarks/results/ has no JSON file"
    page = benchmarks.render_all()
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        section = page.split(f"### `{path.name}` {{#{benchmarks.anchor(path)}}}", 1)
        assert len(section) == 2, f"{path.name} has no section on the Benchmarks page"
        body = section[1].split("\n### ", 1)[0]
        assert "\n|---" in body, f"{path.name}: no table rendered"
        assert f"**Date:** {data.get('date', 'not recorded')}" in body
        assert (f"`{data['command']}`" if "command" in data else "**Command:** not recorded") in body
        if isinstance(data.get("cpu"), dict):
            assert " ".join(data["cpu"]["flags"]) in body
        elif "cpu" not in data:
            assert "**CPU:** not recorded" in body
        names = ([r["contender"] for r in data["rows"] if "contender" in r] if isinstance(data.get("rows"), list)
                 else list(data.get("results", {})))
        for name in names:
            assert f"| {name} |" in body or f"| **{name}** |" in body, f"{path.name}: row {name} missing"


def test_a_result_of_unknown_kind_fails_loudly(tmp_path):
    stray = tmp_path / "gpu_bench-2027-01-01-cuda.json"
    stray.write_text(json.dumps({"date": "2027-01-01"}))
    with pytest.raises(benchmarks.UnknownResultKind, match="gpu_bench-2027-01-01-cuda.json"):
        benchmarks.render_all([stray])


def test_markers_in_pages_name_existing_results():
    for page in sorted((REPO / "docs").rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        rel = page.relative_to(REPO / "docs").as_posix()
        expanded = benchmarks.expand_markers(text, rel)
        assert "<!-- bench: " not in expanded.replace("<!-- bench: every file -->", ""), rel
    with pytest.raises(FileNotFoundError, match="no-such-run.json"):
        benchmarks.expand_markers("<!-- bench: no-such-run.json -->\n", "x.md")


def test_readme_headline_figures_are_the_rendered_ones():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert benchmarks.readme_with_headline(readme) == readme, (
        "README.md's headline figures differ from benchmarks/results: run python docs/gen/benchmarks.py --readme")


def test_readme_starts_with_the_two_commands_and_links_only_existing_pages():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert lines[2:6] == ["```bash", lines[3], lines[4], "```"] and lines[3].startswith("make repro ") \
        and lines[4].startswith("make test ")
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    for target in re.findall(r"\]\(((?:docs/|DEVELOPERS)[^)#]*)", readme):
        assert (REPO / target).is_file(), f"README.md links {target}, which does not exist"
