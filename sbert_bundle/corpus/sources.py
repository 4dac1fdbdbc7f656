"""Inputs of a corpus job, read in fixed-size chunks of rows with bounded memory.

Formats (by the input's name, or --input-format): text lines (`.txt` and anything else; stdin),
JSON lines (`.jsonl`, `.ndjson`: each line a JSON string, or an object and `field`), CSV (`.csv`,
`column`) and Parquet (`.parquet`, `column`), the last two read with pyarrow in record batches.

Every chunk holds `chunk_rows` input rows (the last one fewer) counted from the input's first row,
whatever was skipped or resumed: chunk k is always rows [k * chunk_rows, (k + 1) * chunk_rows), so
its batches, and so its embeddings' bytes, are the same in every run. A chunk's values are as read;
`check_values` decides what a null or non-text value does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

FORMATS = ("text", "jsonl", "csv", "parquet")
ON_INVALID = ("error", "skip", "empty")  # what a null or non-text value does (describe_invalid says why)
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
PYARROW_HINT = "pip install 'sbert-bundle[corpus]'"


class InputError(ValueError):
    """The input cannot be read as asked: one line naming the file and the line, row, field or column."""


@dataclass
class Chunk:
    index: int                 # chunk k holds input rows [k * chunk_rows, ...)
    first_row: int             # the input row (0-based) of values[0]
    values: list               # one per row: str, or anything else for check_values to judge
    end_offset: int | None     # byte offset just after the chunk (text and JSON lines), for resume
    keep: dict = field(default_factory=dict)   # --keep columns: name -> list of values


def input_format(path: str, given: str | None) -> str:
    if given:
        return given
    return "text" if path == "-" else _SUFFIXES.get(Path(path).suffix.lower(), "text")


def fingerprint(path: str) -> dict:
    """What identifies the input for --resume: path, size, mtime and the sha256 of its first MiB."""
    if path == "-":
        return {"path": "-"}
    p = Path(path)
    stat = p.stat()
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return {"path": str(p.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise InputError(f"CSV and Parquet inputs need pyarrow: {PYARROW_HINT}") from None
    return pyarrow


class Source:
    """One input: its format, the chosen field / column, --keep columns, and chunked reading."""

    def __init__(self, path: str, fmt: str, column: str | None, keep: list[str], chunk_rows: int):
        if fmt not in FORMATS:
            raise InputError(f"--input-format {fmt!r}: expected one of {', '.join(FORMATS)}")
        if chunk_rows < 1:
            raise InputError(f"--chunk-rows {chunk_rows}: expected 1 or more")
        if path == "-" and fmt in ("csv", "parquet"):
            raise InputError(f"{fmt} input must be a file, not standard input")
        if fmt in ("csv", "parquet") and not column:
            raise InputError(f"{path} is {fmt}: name the text column with --column (columns: "
                             f"{', '.join(self._tabular_columns(path, fmt))})")
        if fmt == "jsonl" and keep and not column:
            raise InputError(f"{path}: --keep needs --field (lines that are JSON strings have no other fields)")
        if fmt == "text" and (column or keep):
            raise InputError(f"{path} is read as text lines: --field / --column / --keep need JSON lines, CSV or "
                             "Parquet (--input-format)")
        self.path, self.fmt, self.column, self.keep, self.chunk_rows = path, fmt, column, list(keep), chunk_rows
        self.where = "standard input" if path == "-" else path
        if fmt in ("csv", "parquet"):
            names = self._tabular_columns(path, fmt)
            missing = [c for c in [column, *keep] if c not in names]
            if missing:
                raise InputError(f"{path} has no column {missing[0]!r}; its columns: {', '.join(names)}")
            if fmt == "parquet":
                self._check_parquet_type()

    # --- tabular ------------------------------------------------------------------------------

    @staticmethod
    def _tabular_columns(path: str, fmt: str) -> list[str]:
        pa = _pyarrow()
        try:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                return list(pq.ParquetFile(path).schema_arrow.names)
            import pyarrow.csv as pcsv

            with pcsv.open_csv(path, parse_options=pcsv.ParseOptions(newlines_in_values=True)) as reader:
                return list(reader.schema.names)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
            raise InputError(f"{path} cannot be read as {fmt}: {str(e).splitlines()[0][:300]}") from None

    def _check_parquet_type(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        kind = pq.ParquetFile(self.path).schema_arrow.field(self.column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise InputError(f"{self.path}: column {self.column!r} is {kind}, not text")

    def total_rows(self) -> int | None:
        """Rows in the input when that is cheap to know (Parquet metadata; text and JSON lines by
        counting newlines, about 1 GB/s), else None (CSV: quoted fields may hold newlines; stdin)."""
        if self.path == "-":
            return None
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        if self.fmt == "csv":
            return None
        rows, last = 0, b"\n"
        with open(self.path, "rb") as f:
            while block := f.read(1 << 22):
                rows += block.count(b"\n")
                last = block[-1:]
        return rows + (last != b"\n")

    def chunks(self, start_row: int = 0, start_offset: int = 0) -> Iterator[Chunk]:
        """Chunks from input row start_row (a multiple of chunk_rows); text and JSON lines seek to
        start_offset, the byte offset where that row starts."""
        if start_row % self.chunk_rows:
            raise ValueError(f"start_row {start_row} is not a chunk boundary ({self.chunk_rows} rows)")
        if self.fmt in ("text", "jsonl"):
            return self._line_chunks(start_row, start_offset)
        return self._tabular_chunks(start_row)

    def _tabular_chunks(self, start_row: int) -> Iterator[Chunk]:
        pa = _pyarrow()
        columns = list(dict.fromkeys([self.column, *self.keep]))
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(self.path)
            groups, skipped = [], 0  # whole row groups before start_row are not read at all
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if skipped + n <= start_row and not groups:
                    skipped += n
                    continue
                groups.append(g)
            batches = pf.iter_batches(batch_size=self.chunk_rows, columns=columns, row_groups=groups) \
                if groups else iter(())
        else:
            import pyarrow.csv as pcsv

            options = pcsv.ConvertOptions(include_columns=columns,
                                          column_types={c: pa.string() for c in columns})
            parse = pcsv.ParseOptions(newlines_in_values=True)  # quoted texts may hold newlines
            batches = iter(pcsv.open_csv(self.path, parse_options=parse, convert_options=options))
            skipped = 0
        row = skipped
        pending: list = []
        have = 0
        index = start_row // self.chunk_rows
        try:
            for batch in batches:
                if row + batch.num_rows <= start_row:  # before the resume point: read, not kept
                    row += batch.num_rows
                    continue
                if row < start_row:
                    batch = batch.slice(start_row - row)
                    row = start_row
                pending.append(batch)
                have += batch.num_rows
                while have >= self.chunk_rows:
                    table = pa.Table.from_batches(pending)
                    yield self._tabular_chunk(index, row, table.slice(0, self.chunk_rows))
                    rest = table.slice(self.chunk_rows)
                    pending, have = rest.to_batches(), rest.num_rows
                    row += self.chunk_rows
                    index += 1
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise InputError(f"{self.path} cannot be read as {self.fmt} after row {row}: "
                             f"{str(e).splitlines()[0][:300]}") from None
        if have:
            yield self._tabular_chunk(index, row, pa.Table.from_batches(pending))

    def _tabular_chunk(self, index: int, first_row: int, table) -> Chunk:
        return Chunk(index, first_row, table.column(self.column).to_pylist(), None,
                     {k: table.column(k).to_pylist() for k in self.keep})

    # --- lines --------------------------------------------------------------------------------

    def _line_chunks(self, start_row: int, start_offset: int) -> Iterator[Chunk]:
        stream = sys.stdin.buffer if self.path == "-" else open(self.path, "rb")
        try:
            if start_offset:
                stream.seek(start_offset)
            row, offset, index = start_row, start_offset, start_row // self.chunk_rows
            values: list = []
            keep: dict[str, list] = {k: [] for k in self.keep}
            for raw in stream:
                line = raw[:-1] if raw.endswith(b"\n") else raw
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(f"{self.where} is not UTF-8 text: byte 0x{line[e.start]:02x} on line {row + 1} "
                                     f"(byte offset {offset + e.start}) ({e.reason})") from None
                text = text.rstrip("\r")
                if self.fmt == "jsonl":
                    self._json_row(text, row, values, keep)
                else:
                    values.append(text)
                row += 1
                offset += len(raw)
                if len(values) == self.chunk_rows:
                    yield Chunk(index, row - len(values), values, offset, keep)
                    values, keep, index = [], {k: [] for k in self.keep}, index + 1
            if values:
                yield Chunk(index, row - len(values), values, offset, keep)
        finally:
            if stream is not sys.stdin.buffer:
                stream.close()

    def _json_row(self, text: str, row: int, values: list, keep: dict) -> None:
        try:
            item = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{self.where} line {row + 1} is not JSON: {e.msg} (column {e.colno})") from None
        if self.column is None:
            values.append(item)  # a JSON string per line; anything else is judged by check_values
            return
        if not isinstance(item, dict):
            raise InputError(f"{self.where} line {row + 1} is a JSON {type(item).__name__}, not an object with "
                             f"field {self.column!r}")
        if self.column not in item:
            values.append(MissingField(sorted(item)))
        else:
            values.append(item[self.column])
        for k in self.keep:
            keep[k].append(item.get(k))


class MissingField:
    """A JSON lines row without the field: invalid like a null, and its message lists the fields there are."""

    def __init__(self, fields: list[str]):
        self.fields = fields


def describe_invalid(value, column: str | None) -> str:
    """Why a value is not text, for the error or the skipped-rows record."""
    name = f"field {column!r}" if column else "value"
    if isinstance(value, MissingField):
        return f"has no field {column!r} (its fields: {', '.join(value.fields) or 'none'})"
    if value is None:
        return f"{name} is null"
    return f"{name} is {type(value).__name__}, not text"
