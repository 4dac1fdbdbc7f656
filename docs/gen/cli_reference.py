"""The CLI reference pages, rendered at build time from the code (never copied by hand).

- `sbert-bundle`: walked from the argparse parser that `sbert_bundle.cli.main` parses with
  (`build_parser()`): every subcommand, its usage, description, arguments and epilog.
- `python -m stages.<name>`: each stage builds its parser inside `stages.common.stage_main`, so
  its page section is the `--help` that the module prints, run in a subprocess from the repository.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WIDTH = 100  # usage lines and --help output are wrapped at this width, whatever the terminal


def _text(text: str) -> str:
    """Plain help text as markdown: `<` and `>` outside code spans escaped, so `artifacts/<model>/` stays text."""
    parts = str(text).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return _text(" ".join(str(text).split())).replace("|", "\\|")


def _formatter(parser: argparse.ArgumentParser) -> argparse.HelpFormatter:
    return parser.formatter_class(prog=parser.prog, width=WIDTH)


def _usage(parser: argparse.ArgumentParser) -> str:
    fmt = _formatter(parser)
    fmt.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return fmt.format_help().strip()


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.default is None or action.default is argparse.SUPPRESS:
        return ""
    return f"`{action.default}`"


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    fmt = _formatter(parser)
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        invocation = " ".join(fmt._format_action_invocation(action).split())
        help_text = fmt._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            help_text += " (required)"
        rows.append(f"| `{invocation}` | {_default(action)} | {_cell(help_text)} |")
    if not rows:
        return []
    return ["| argument | default | what it does |", "|---|---|---|", *rows]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Every subcommand of parser: name -> (its parser, its one-line help), in the order they were added."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (sub, helps.get(name, ""))
    return found


def render_cli(parser: argparse.ArgumentParser) -> str:
    """The `sbert-bundle` reference page, from its parser."""
    out = [
        "# `sbert-bundle` command line",
        "",
        "Generated from `sbert_bundle.cli.build_parser()` when the site is built; `sbert-bundle COMMAND --help` "
        "prints the same.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
    ]
    if parser.description:
        out += [_text(parser.description.strip()), ""]
    out += _arguments_table(parser) + [""]
    subs = subcommands(parser)
    out += ["| command | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#{name}) | {_cell(help_text)} |" for name, (_, help_text) in subs.items()]
    out.append("")
    for name, (sub, help_text) in subs.items():
        out += [f"## `sbert-bundle {name}` {{#{name}}}", ""]
        if help_text:
            out += [f"*{_cell(help_text)}*", ""]
        out += ["```text", _usage(sub), "```", ""]
        if sub.description:
            out += [_text(sub.description.strip()), ""]
        out += _arguments_table(sub) + [""]
        if sub.epilog:
            out += [_text(sub.epilog.strip()), ""]
    return "\n".join(out).rstrip() + "\n"


def stage_modules() -> list[str]:
    """The modules that run as `python -m stages.<name>` (those with a __main__ block): the DVC stages in
    dvc.yaml's order, then the others by name."""
    names = [path.stem for path in sorted((REPO / "stages").glob("*.py"))
             if re.search(r'^if __name__ == "__main__":', path.read_text(encoding="utf-8"), re.MULTILINE)]
    dag = list(dvc_stages())
    return [n for n in dag if n in names] + [n for n in names if n not in dag]


def dvc_stages() -> dict[str, str]:
    """module -> DVC stage name, from the `cmd` of each stage of dvc.yaml."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8")).get("stages") or {}
    found = {}
    for stage, spec in stages.items():
        cmd = (spec.get("do") or spec).get("cmd", "")
        for module in re.findall(r"python -m stages\.(\w+)", " ".join(cmd) if isinstance(cmd, list) else cmd):
            found.setdefault(module, stage)
    return found


def make_targets() -> dict[str, list[str]]:
    """module -> the Makefile targets whose recipe runs `-m stages.<module>`."""
    found: dict[str, list[str]] = {}
    target = None
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        head = re.match(r"^([A-Za-z][\w-]*):", line)
        if head:
            target = head.group(1)
        elif line.startswith("\t") and target:
            for module in re.findall(r"-m stages\.(\w+)", line):
                found.setdefault(module, []).append(target)
    return found


def _run_by(name: str, dvc: dict[str, str], make: dict[str, list[str]]) -> str:
    ways = []
    if name in dvc:
        ways.append(f"DVC stage `{dvc[name]}` (`dvc repro`)")
    ways += [f"`make {t}`" for t in make.get(name, [])]
    return ", ".join(ways) or "by hand"


def _summary(name: str) -> str:
    doc = ast.get_docstring(ast.parse((REPO / "stages" / f"{name}.py").read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def stage_help(name: str) -> str:
    """`python -m stages.<name> --help`, run from the repository with this interpreter."""
    env = {**os.environ, "COLUMNS": str(WIDTH)}
    proc = subprocess.run([sys.executable, "-m", f"stages.{name}", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m stages.{name} --help exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.rstrip()


def render_stages(names: list[str] | None = None) -> str:
    """The pipeline stages' reference page: each module's --help."""
    names = stage_modules() if names is None else names
    out = [
        "# Pipeline stages: `python -m stages.<name>`",
        "",
        "Generated when the site is built by running `python -m stages.<name> --help` for every module of "
        "`stages/` that has a `__main__` block; *run by* is read from `dvc.yaml`'s commands and the Makefile's "
        "recipes. A DVC stage is one cell per model: `fetch@minilm_l6` runs `python -m stages.fetch --model "
        "minilm_l6`. What each stage writes: [Pipeline and configuration](../pipeline.md).",
        "",
        "| module | run by | what it does (its docstring's first line) |",
        "|---|---|---|",
    ]
    dvc, make = dvc_stages(), make_targets()
    out += [f"| [`stages.{n}`](#{n.replace('_', '-')}) | {_run_by(n, dvc, make)} | {_cell(_summary(n))} |"
            for n in names]
    out.append("")
    for name in names:
        out += [f"## `stages.{name}` {{#{name.replace('_', '-')}}}", "", "```text", stage_help(name), "```", ""]
    return "\n".join(out).rstrip() + "\n"
