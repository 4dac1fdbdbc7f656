"""Corpus jobs (`sbert-bundle encode`): formats, bounded memory, progress, resume, workers, bad input.

Runs on the tiny bundle; the subprocess tests run the real CLI. The Ray Data path is tested on
the two-node loopback cluster in tests/test_cluster.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SENTENCES

pa = pytest.importorskip("pyarrow", reason="pyarrow is the optional extra [corpus]")
import pyarrow.csv as pcsv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from sbert_bundle import Bundle  # noqa: E402
from sbert_bundle.cli import main  # noqa: E402
from sbert_bundle.corpus.job import Progress, Settings, run  # noqa: E402

CLI = [sys.executable, "-m", "sbert_bundle.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def corpus(n: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} number {i}" + " and more words" * (i % 7) for i in range(n)]


def write_inputs(folder: Path, texts: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"text": folder / "in.txt", "jsonl": folder / "in.jsonl", "csv": folder / "in.csv",
             "parquet": folder / "in.parquet"}
    paths["text"].write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps({"doc": i, "text": t}) + "\n" for i, t in enumerate(texts)),
                              encoding="utf-8")
    table = pa.table({"doc": list(range(len(texts))), "text": texts})
    pcsv.write_csv(table, paths["csv"])
    pq.write_table(table, paths["parquet"], row_group_size=7)  # row groups that do not match the chunks
    return paths


def settings(inp: Path, out: Path | None, **kw) -> Settings:
    column = kw.pop("column", None)
    if column is None and inp.suffix in (".jsonl", ".csv", ".parquet"):
        column = "text"
    return Settings(input=str(inp), output=str(out) if out else None, column=column, quiet=True,
                    **{"chunk_rows": 16, **kw})


def read_embeddings(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    if path.suffix == ".parquet":
        return np.array(pq.read_table(path).column("embedding").to_pylist(), dtype=np.float32)
    return np.array([json.loads(line) for line in path.read_text().splitlines()], dtype=np.float32)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".progress" in p.name
                  or p.name.endswith(".parts"))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus(100)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, texts) -> dict[str, Path]:
    return write_inputs(tmp_path_factory.mktemp("corpus"), texts)


@pytest.fixture(scope="module")
def reference(tiny_bundle, inputs, tmp_path_factory) -> np.ndarray:
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    run(str(tiny_bundle), settings(inputs["text"], out))
    return np.load(out)


# --- formats -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv", "parquet"])
@pytest.mark.parametrize("suffix", [".npy", ".parquet", ".jsonl"])
def test_every_input_and_output_format_gives_the_same_embeddings(fmt, suffix, tiny_bundle, inputs, reference,
                                                                  texts, tmp_path):
    out = tmp_path / f"out{suffix}"
    summary = run(str(tiny_bundle), settings(inputs[fmt], out))
    assert summary["rows_out"] == len(texts) and leftovers(tmp_path) == []
    got = read_embeddings(out)
    if suffix == ".jsonl":  # 7 decimals
        np.testing.assert_allclose(got, reference, atol=6e-8)
    else:
        np.testing.assert_array_equal(got, reference)  # same chunks, same batches: the same bytes


def test_streaming_equals_encoding_in_memory(tiny_bundle, inputs, reference, texts, tmp_path):
    """Chunked or whole, each embedding is Bundle.encode's (to float rounding of other batchings)."""
    whole = Bundle.load(tiny_bundle).encode(texts)
    np.testing.assert_allclose(reference, whole, atol=2e-6)
    out = tmp_path / "one-chunk.npy"
    run(str(tiny_bundle), settings(inputs["text"], out, chunk_rows=len(texts)))
    np.testing.assert_array_equal(np.load(out), whole)  # one chunk holding everything: encode's own batches


def test_parquet_output_has_ids_and_kept_columns(tiny_bundle, inputs, tmp_path):
    out = tmp_path / "out.parquet"
    run(str(tiny_bundle), settings(inputs["parquet"], out, keep=["doc"], dtype="float16"))
    table = pq.read_table(out)
    assert table.schema.names == ["id", "embedding", "doc"]
    assert str(table.schema.field("embedding").type) == "fixed_size_list<element: halffloat>[32]"
    assert table.column("id").to_pylist() == table.column("doc").to_pylist() == list(range(100))
    assert pq.ParquetFile(out).metadata.num_row_groups == 7  # one per chunk of 16 rows


def test_float16_npy_is_the_float32_result_rounded(tiny_bundle, inputs, reference, tmp_path):
    out = tmp_path / "half.npy"
    run(str(tiny_bundle), settings(inputs["text"], out, dtype="float16"))
    got = np.load(out)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, reference.astype(np.float16))


def test_stdout_json_lines(tiny_bundle, inputs, reference):
    stream = io.StringIO()
    run(str(tiny_bundle), settings(inputs["text"], None), stdout=stream)
    got = np.array([json.loads(line) for line in stream.getvalue().splitlines()], dtype=np.float32)
    np.testing.assert_allclose(got, reference, atol=6e-8)


def test_empty_input_gives_an_empty_array(tiny_bundle, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    run(str(tiny_bundle), settings(tmp_path / "empty.txt", tmp_path / "e.npy"))
    assert np.load(tmp_path / "e.npy").shape == (0, 32)


# --- workers -----------------------------------------------------------------------------------

def test_two_workers_write_the_bytes_of_one(tiny_bundle, inputs, tmp_path):
    for workers in (1, 2):
        subprocess.run([*CLI, "encode", str(tiny_bundle), "-i", str(inputs["parquet"]), "--column", "text", "-q",
                        "--chunk-rows", "16", "--workers", str(workers), "-o", str(tmp_path / f"w{workers}.parquet")],
                       check=True, env=ENV, cwd=tmp_path)
    assert (tmp_path / "w1.parquet").read_bytes() == (tmp_path / "w2.parquet").read_bytes()


# --- resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_sigkill_then_resume_writes_the_bytes_of_an_uninterrupted_run(suffix, tiny_bundle, tmp_path):
    inp = write_inputs(tmp_path / "in", corpus(3000))["text"]
    whole = tmp_path / f"whole{suffix}"
    args = ["encode", str(tiny_bundle), "-i", str(inp), "--chunk-rows", "100", "-q"]
    subprocess.run([*CLI, *args, "-o", str(whole)], check=True, env=ENV)
    out = tmp_path / f"out{suffix}"
    record = out.with_name(out.name + ".progress.json")
    proc = subprocess.Popen([*CLI, *args, "-o", str(out)], env=ENV)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill once a few chunks are committed, well before the end
        if record.exists() and json.loads(record.read_text())["rows_in"] >= 300:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(record.read_text())
    assert 300 <= state["rows_in"] < 3000 and not out.exists(), state["rows_in"]
    refused = subprocess.run([*CLI, *args, "-o", str(out)], env=ENV, capture_output=True, text=True)
    assert refused.returncode == 1 and "left by an interrupted run: add --resume" in refused.stderr
    resumed = subprocess.run([*CLI, *args, "-o", str(out), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("change, named", [
    ("input", "the input changed (size:"),
    ("dtype", "dtype: 'float32' -> 'float16'"),
    ("variant", "variant: 'fp32-fused' -> 'fp32'"),
    ("bundle", "the bundle changed (manifest sha256)"),
])
def test_resume_against_something_else_is_refused_naming_it(change, named, tiny_bundle, tmp_path):
    import shutil

    inp = tmp_path / "in.txt"
    inp.write_text("".join(t + "\n" for t in corpus(40)))
    out = tmp_path / "out.npy"
    record = out.with_name(out.name + ".progress.json")
    s = settings(inp, out, variant="fp32-fused")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    # an interrupted run: its progress record and partial output, as a kill leaves them
    with pytest.raises(KeyboardInterrupt):
        _interrupt_after_first_chunk(bundle, s)
    assert record.exists()
    if change == "input":
        inp.write_text(inp.read_text() + "one more line\n")
    elif change == "dtype":
        s.dtype = "float16"
    elif change == "variant":
        s.variant = "fp32"
    else:
        manifest = json.loads((bundle / "manifest.json").read_text())
        manifest["version"] = "9.9.9"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        from sbert_bundle.manifest import write_manifest

        write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"})
    s.resume = True
    with pytest.raises(ValueError) as e:
        run(str(bundle), s)
    assert "--resume refused" in str(e.value) and named in str(e.value), str(e.value)


def _interrupt_after_first_chunk(bundle: Path, s: Settings) -> None:
    """Run until the first chunk is committed, then raise KeyboardInterrupt (as Ctrl-C would)."""
    from sbert_bundle.corpus import job

    real = job._write_record

    def write_then_stop(path, record):
        real(path, record)
        raise KeyboardInterrupt

    job._write_record = write_then_stop
    try:
        run(str(bundle), s)
    finally:
        job._write_record = real


def test_resume_without_a_record_and_on_stdout_are_refused(tiny_bundle, inputs, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        run(str(tiny_bundle), settings(inputs["text"], tmp_path / "x.npy", resume=True))
    with pytest.raises(ValueError, match="standard output cannot be resumed"):
        run(str(tiny_bundle), settings(inputs["text"], None, resume=True))
    with pytest.raises(ValueError, match="standard input cannot be read again"):
        run(str(tiny_bundle), Settings(input="-", output=str(tmp_path / "x.npy"), resume=True, quiet=True))


# --- memory ------------------------------------------------------------------------------------

MEMORY_PROBE = """
import resource, sys
from sbert_bundle.corpus.job import Settings, run
run(sys.argv[1], Settings(input=sys.argv[2], output=sys.argv[3], quiet=True, chunk_rows=2000))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_the_corpus(tiny_bundle, tmp_path):
    """Peak RSS (ru_maxrss of the job's own process) for 20,000 and 200,000 rows: holding the output
    would add 23 MB (180,000 x 32 float32) and holding the texts more; the job holds neither, so the
    two peaks are within 12 MB."""
    peaks = {}
    for n in (20_000, 200_000):
        inp = tmp_path / f"in{n}.txt"
        with open(inp, "w") as f:
            for i in range(n):
                f.write(f"row {i} of the corpus about {SENTENCES[i % len(SENTENCES)]}\n")
        out = tmp_path / f"out{n}.npy"
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tiny_bundle), str(inp), str(out)],
                              check=True, env=ENV, capture_output=True, text=True)
        peaks[n] = int(done.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
        assert np.load(out, mmap_mode="r").shape == (n, 32)
    assert peaks[200_000] - peaks[20_000] < 12, peaks


# --- progress ----------------------------------------------------------------------------------

def test_progress_off_a_terminal_is_log_lines_and_quiet_is_nothing():
    stream = io.StringIO()
    p = Progress(total=1000, done=0, quiet=False, stream=stream, every=0)
    p.update(250)
    p.update(250)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("encode: 500 rows of 1000 (50%), ") and "ETA" in lines[1]
    quiet = io.StringIO()
    q = Progress(total=None, done=0, quiet=True, stream=quiet, every=0)
    q.update(10)
    assert quiet.getvalue() == ""


def test_the_total_is_counted_where_it_is_cheap(inputs):
    from sbert_bundle.corpus.sources import Source

    assert Source(str(inputs["text"]), "text", None, [], 16).total_rows() == 100
    assert Source(str(inputs["parquet"]), "parquet", "text", [], 16).total_rows() == 100
    assert Source(str(inputs["csv"]), "csv", "text", [], 16).total_rows() is None


def test_cli_progress_lines_go_to_stderr(tiny_bundle, inputs, tmp_path):
    done = subprocess.run([*CLI, "encode", str(tiny_bundle), "-i", str(inputs["text"]), "-o",
                           str(tmp_path / "o.npy")], env=ENV, capture_output=True, text=True, check=True)
    assert done.stdout == "" and "wrote 100 x 32 float32 embeddings to" in done.stderr


# --- bad input ---------------------------------------------------------------------------------

def _cli(tiny_bundle, *args, cwd=None):
    return subprocess.run([*CLI, "encode", str(tiny_bundle), *args], env=ENV, capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_missing_column_names_the_columns_there_are(fmt, tiny_bundle, inputs, tmp_path):
    done = _cli(tiny_bundle, "-i", str(inputs[fmt]), "--column", "body", "-o", str(tmp_path / "o.npy"))
    assert done.returncode == 1
    assert done.stderr.strip() == f"sbert-bundle: error: {inputs[fmt]} has no column 'body'; its columns: doc, text"
    assert list(tmp_path.iterdir()) == []


def test_a_null_names_its_row_and_leaves_nothing(tiny_bundle, tmp_path):
    texts = corpus(50)
    table = pa.table({"text": texts[:37] + [None] + texts[38:]})
    pq.write_table(table, tmp_path / "in.parquet")
    done = _cli(tiny_bundle, "-i", str(tmp_path / "in.parquet"), "--column", "text", "--chunk-rows", "16",
                "-o", str(tmp_path / "o.npy"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"sbert-bundle: error: {tmp_path / 'in.parquet'} row 37: field 'text' is null (--on-invalid skip or empty "
        "to go on)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]  # no output, no partial, no record


def test_skip_and_empty_record_the_rows(tiny_bundle, tmp_path):
    lines = [json.dumps({"text": t}) for t in corpus(20)]
    lines[3] = json.dumps({"text": 7})
    lines[11] = json.dumps({"title": "no text"})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    for mode in ("skip", "empty"):
        out = tmp_path / f"{mode}.parquet"
        run(str(tiny_bundle), settings(tmp_path / "in.jsonl", out, on_invalid=mode))
        table = pq.read_table(out)
        ids = table.column("id").to_pylist()
        assert ids == ([i for i in range(20) if i not in (3, 11)] if mode == "skip" else list(range(20)))
        record = [json.loads(x) for x in (tmp_path / f"{mode}.parquet.skipped.jsonl").read_text().splitlines()]
        assert record == [{"row": 3, "reason": "field 'text' is int, not text"},
                          {"row": 11, "reason": "has no field 'text' (its fields: title)"}]
    empty = read_embeddings(tmp_path / "empty.parquet")
    np.testing.assert_allclose(empty[3], Bundle.load(tiny_bundle).encode([""])[0], atol=1e-6)


def test_a_line_that_is_not_utf8_names_its_line_and_byte_offset(tiny_bundle, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"fine\nalso fine\nbad \xff here\n")
    done = _cli(tiny_bundle, "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.npy"))
    assert done.returncode == 1
    assert done.stderr.strip() == (f"sbert-bundle: error: {tmp_path / 'in.txt'} is not UTF-8 text: byte 0xff on "
                                   "line 3 (byte offset 19) (invalid start byte)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


@pytest.mark.parametrize("args, message", [
    (["--column", "doc"], "column 'doc' is int64, not text"),
    (["--column", "text", "-o", "x.npy", "--keep", "doc"], "--keep needs a Parquet output; x.npy is npy"),
    (["--column", "text", "-o", "x.csv"], "x.csv: the output's name decides its format; use .npy, .parquet or .jsonl"),
    ([], "is parquet: name the text column with --column (columns: doc, text)"),
])
def test_bad_flags_are_one_line(args, message, tiny_bundle, inputs, tmp_path):
    done = _cli(tiny_bundle, "-i", str(inputs["parquet"]), *args, cwd=tmp_path)
    assert done.returncode == 1 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, \
        done.stderr
    assert list(tmp_path.iterdir()) == []


def test_help_names_the_formats_and_resume(capsys):
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    out = capsys.readouterr().out
    for word in (".parquet", "--resume", "--workers", "--on-invalid", "OUT.progress.json", "--keep", "float16"):
        assert word in out
