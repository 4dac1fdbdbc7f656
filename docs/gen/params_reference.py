"""The `params.yaml` reference page, rendered at build time.

Values come from the committed `params.yaml` (what `dvc repro` reads); the notes beside them are
the comments of the `conf/` file each section is composed from (`conf/<section>/default.yaml`,
`conf/model/<key>.yaml`, or `conf/config.yaml` for the root's own keys), matched by key path.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def _comment_at(rest: str) -> int:
    """Where the trailing comment of a line's value part starts (a `#` after whitespace, outside
    quotes), or -1."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return i
    return -1


def conf_comments(path: Path, prefix: tuple[str, ...] = ()) -> tuple[list[str], dict[tuple[str, ...], str]]:
    """The file's header (the comment lines before its first key), and key path -> its note: the
    comment lines just above the key, the comment on its line, and the lines that continue that
    comment at the same column."""
    header: list[str] = []
    notes: dict[tuple[str, ...], list[str]] = {}
    pending: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    seen_key = False
    last_path: tuple[str, ...] | None = None
    last_column = -1  # column of the last trailing comment, for its continuation lines
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped:
            pending, last_column = [], -1  # a comment block followed by a blank line belongs to no key
            continue
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            column = len(line) - len(line.lstrip())
            if text.startswith("@package"):
                continue
            if not seen_key:
                header.append(text)
            elif last_path is not None and column == last_column:
                notes[last_path].append(text)
            else:
                pending.append(text)
                last_column = -1
            continue
        match = _KEY.match(line)
        if not match:
            continue  # a list item, or a flow value continued on the next line
        seen_key = True
        indent, key = len(match.group("indent")), match.group("key")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key_path = prefix + tuple(k for _, k in stack) + (key,)
        rest = match.group("rest")
        at = _comment_at(rest)
        notes[key_path] = pending + ([rest[at + 1:].strip()] if at >= 0 else [])
        pending = []
        last_column = len(line) - len(rest) + at if at >= 0 else -1
        last_path = key_path
        stack.append((indent, key))
    return header, {k: " ".join(v) for k, v in notes.items() if v}


def _flatten(value, path: tuple[str, ...]):
    """(path, value) for every node: mappings first as themselves (value None), then their keys."""
    if isinstance(value, dict) and value:
        yield path, None
        for key, sub in value.items():
            yield from _flatten(sub, path + (str(key),))
    else:
        yield path, value


def _value(value) -> str:
    """The value as YAML flow style, as it would be written in conf/ (`'9.0'` stays a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    return f"`{text}`".replace("|", "\\|")


def _note(text: str) -> str:
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def sources(section: str, params: dict) -> list[tuple[Path, tuple[str, ...]]]:
    """The conf/ files a top-level section of params.yaml is composed from, with the key prefix of each."""
    group = REPO / "conf" / section
    if section == "model":
        return [(group / f"{key}.yaml", ("model", key)) for key in params.get("model", {})
                if (group / f"{key}.yaml").is_file()]
    if (group / "default.yaml").is_file():
        return [(group / "default.yaml", (section,))]
    return [(REPO / "conf" / "config.yaml", ())]


def render_params(params_path: Path | None = None) -> str:
    params_path = params_path or REPO / "params.yaml"
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    out = [
        "# `params.yaml` reference",
        "",
        "Generated when the site is built from the committed `params.yaml` (what `dvc repro` reads), with the "
        "comments of the `conf/` file each section is composed from. `params.yaml` is the composition of "
        "`conf/` (`python -m stages.compose`; `tests/test_config.py` fails when they differ); change a value "
        "in `conf/` or with `dvc exp run -S key=value`, never in `params.yaml` alone. "
        "How the composition works: [Pipeline and configuration](../pipeline.md).",
        "",
        "| section | composed from |",
        "|---|---|",
    ]
    for section in params:
        files = ", ".join(f"`{p.relative_to(REPO)}`" for p, _ in sources(section, params)) or "not recorded"
        out.append(f"| [`{section}`](#{section}) | {files} |")
    out.append("")
    for section, value in params.items():
        header: list[str] = []
        notes: dict[tuple[str, ...], str] = {}
        for path, prefix in sources(section, params):
            file_header, file_notes = conf_comments(path, prefix)
            notes.update(file_notes)
            if section == "model":  # one file per model: its header describes that model
                notes[prefix] = " ".join(file_header + ([file_notes[prefix]] if prefix in file_notes else []))
            elif path.name != "config.yaml":
                header += file_header
        if section == "model":
            available = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
            header.append(f"`params.yaml` builds {', '.join(f'`{k}`' for k in value)}; `conf/model/` has "
                          f"{', '.join(f'`{k}`' for k in available)} (pick with `dvc exp run -S 'model=[...]'`).")
        out += [f"## `{section}` {{#{section}}}", ""]
        intro = header + ([notes[(section,)]] if (section,) in notes else [])
        if intro:
            out += [_note(" ".join(intro)), ""]
        out += ["| key | value | note (from conf/) |", "|---|---|---|"]
        for path, leaf in _flatten(value, (section,)):
            if len(path) == 1:
                continue
            note = _note(notes.get(path, ""))
            shown = "" if leaf is None and isinstance(_lookup(value, path[1:]), dict) else _value(leaf)
            out.append(f"| `{'.'.join(path)}` | {shown} | {note} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _lookup(value, path):
    for key in path:
        value = value[key]
    return value
