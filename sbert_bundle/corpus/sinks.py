"""Outputs of a corpus job, committed chunk by chunk so that a killed run can resume.

`.npy` (float32 or float16; its 128-byte header is written last, in place), Parquet (`id` = the
input row, `embedding` a fixed-size list, then any --keep columns; one row group per chunk) and
JSON lines (one list per row, 7 decimals), chosen by the output's name. While a job runs, its
data lives beside the output (OUT.partial, or OUT.parts/ for Parquet); `finish` moves it into
place, so OUT is either absent, the previous file, or complete. `commit` returns what the
progress record needs to find the committed end again; `open(..., resume=state)` cuts off
anything written after it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

OUTPUT_FORMATS = {".npy": "npy", ".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
NPY_HEADER_BYTES = 128  # numpy pads a version 1.0 header to 64 bytes; any 2-D shape fits in 128


def output_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise ValueError(f"{path}: the output's name decides its format; use .npy, .parquet or .jsonl")
    return OUTPUT_FORMATS[suffix]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_lines(emb: np.ndarray):
    """One JSON list per embedding, 7 decimals (embeddings are finite: Bundle.embed refuses others)."""
    for row in emb:
        yield json.dumps([round(float(x), 7) for x in row], allow_nan=False) + "\n"


def embedding_column(emb: np.ndarray, dtype=np.float32):
    """(rows, dim) embeddings as a pyarrow fixed-size list column of float32 or float16."""
    import pyarrow as pa

    emb = np.ascontiguousarray(emb, dtype=dtype)
    values = pa.array(emb.reshape(-1), type=pa.float16() if emb.dtype == np.float16 else pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, emb.shape[1])


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass


def npy_header(rows: int, dim: int, dtype: np.dtype) -> bytes:
    header = "{'descr': %r, 'fortran_order': False, 'shape': (%d, %d), }" % (np.dtype(dtype).str, rows, dim)
    body = header.encode("latin1")
    pad = NPY_HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {NPY_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + (NPY_HEADER_BYTES - 10).to_bytes(2, "little") + body + b" " * pad + b"\n"


class AppendSink:
    """.npy or JSON lines: one file appended to, cut back to the committed size on resume."""

    def __init__(self, path: Path, fmt: str, dim: int, dtype: str):
        self.path, self.fmt, self.dim = Path(path), fmt, dim
        self.dtype = np.dtype(dtype)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.file = None

    def open(self, resume: dict | None) -> None:
        if resume is None:
            self.file = open(self.partial, "wb")
            if self.fmt == "npy":
                self.file.write(npy_header(0, self.dim, self.dtype))  # rewritten with the row count at the end
        else:
            self.file = open(self.partial, "r+b")
            self.file.truncate(resume["bytes"])
            self.file.seek(resume["bytes"])

    def write(self, ids: np.ndarray, emb: np.ndarray, keep: dict) -> None:
        if self.fmt == "npy":
            self.file.write(np.ascontiguousarray(emb, dtype=self.dtype).tobytes())
        else:
            self.file.writelines(line.encode() for line in json_lines(emb))

    def commit(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"bytes": self.file.tell()}

    def finish(self, rows: int) -> None:
        if self.fmt == "npy":
            self.file.seek(0)
            self.file.write(npy_header(rows, self.dim, self.dtype))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)

    def discard(self) -> None:
        if self.file is not None:
            _close_quietly(self.file)  # closing flushes: a full disk fails again here
        self.partial.unlink(missing_ok=True)

    def leftovers(self) -> list[Path]:
        return [self.partial]


class ParquetSink:
    """Parquet: each chunk is a part file (written, then renamed into OUT.parts/); `finish` streams
    the parts in order into one file, one row group per part."""

    def __init__(self, path: Path, dim: int, dtype: str, keep: list[str]):
        import pyarrow as pa

        self.path, self.dim, self.keep = Path(path), dim, keep
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.value_type = pa.float16() if np.dtype(dtype) == np.float16 else pa.float32()
        self.dtype = np.dtype(dtype)
        self.count = 0

    def open(self, resume: dict | None) -> None:
        if resume is None:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts.mkdir()
            return
        self.count = resume["parts"]
        for part in self.parts.iterdir():  # parts written after the last commit
            if not part.name.startswith("part-") or int(part.name[5:13]) >= self.count:
                part.unlink()

    def write(self, ids: np.ndarray, emb: np.ndarray, keep: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        columns = {"id": pa.array(ids, type=pa.int64()), "embedding": embedding_column(emb, self.dtype)}
        for name in self.keep:
            try:
                columns[name] = pa.array(keep[name])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ValueError(f"--keep {name}: its values have no single type ({str(e).splitlines()[0][:200]})") \
                    from None
        part = self.parts / f"part-{self.count:08d}.parquet"
        tmp = part.with_name("." + part.name + ".tmp")
        pq.write_table(pa.table(columns), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, part)
        self.count += 1

    def commit(self) -> dict:
        _fsync_dir(self.parts)
        return {"parts": self.count}

    def finish(self, rows: int) -> None:
        import pyarrow.parquet as pq

        partial = self.path.with_name(self.path.name + ".partial")
        parts = [self.parts / f"part-{i:08d}.parquet" for i in range(self.count)]
        schema = pq.read_schema(parts[0]) if parts else self._empty_schema()
        with pq.ParquetWriter(partial, schema) as writer:
            for part in parts:  # one part in memory at a time
                table = pq.read_table(part)
                writer.write_table(table.cast(schema), row_group_size=max(table.num_rows, 1))
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(partial, 0o644)
        os.replace(partial, self.path)
        _fsync_dir(self.path.parent)
        shutil.rmtree(self.parts)

    def _empty_schema(self):
        import pyarrow as pa

        return pa.schema([("id", pa.int64()), ("embedding", pa.list_(self.value_type, self.dim))]
                         + [(k, pa.null()) for k in self.keep])

    def discard(self) -> None:
        shutil.rmtree(self.parts, ignore_errors=True)
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)

    def leftovers(self) -> list[Path]:
        return [self.parts, self.path.with_name(self.path.name + ".partial")]


class StdoutSink:
    """JSON lines on standard output: streamed, not resumable."""

    def __init__(self, stream):
        self.stream = stream

    def open(self, resume):
        pass

    def write(self, ids, emb, keep) -> None:
        self.stream.writelines(json_lines(emb))

    def commit(self) -> dict:
        self.stream.flush()
        return {}

    def finish(self, rows: int) -> None:
        self.stream.flush()

    def discard(self) -> None:
        pass

    def leftovers(self) -> list[Path]:
        return []


def open_sink(path: str | None, dim: int, dtype: str, keep: list[str], stdout=None):
    if path is None or path == "-":
        if keep:
            raise ValueError("--keep needs a Parquet output (-o FILE.parquet)")
        return StdoutSink(stdout)
    fmt = output_format(path)
    if keep and fmt != "parquet":
        raise ValueError(f"--keep needs a Parquet output; {path} is {fmt}")
    if dtype == "float16" and fmt == "jsonl":
        raise ValueError(f"--dtype float16 is for .npy and Parquet outputs; {path} is JSON lines")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("Parquet output needs pyarrow: pip install 'sbert-bundle[corpus]'") from None
        return ParquetSink(Path(path), dim, dtype, keep)
    return AppendSink(Path(path), fmt, dim, dtype)
