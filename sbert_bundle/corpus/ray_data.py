"""Embed a Ray Dataset beyond one machine: `embed(dataset, bundle, column=...)`.

    import ray
    from sbert_bundle.corpus.ray_data import embed

    ds = ray.data.read_parquet("s3://bucket/corpus/")           # or any Ray Dataset
    embed(ds, "/shared/bundles/minilm.tar.gz", column="text").write_parquet("s3://bucket/embeddings/")

Built on `Dataset.map_batches` with a callable class: each actor loads the bundle once (a path
every node sees) and encodes its batches with `Bundle.encode`, so a vector is exactly what the
single-process job gives for the same batch. The result has the input's columns plus
`embedding`, a fixed-size list of float32. The variant is chosen once, on the driver (or named),
so that nodes of different CPU kinds all run the same one. Needs Ray Data and pyarrow:
pip install 'sbert-bundle[cpu,corpus,cluster]'.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..bundle import Bundle
from .sinks import embedding_column
from .sources import ON_INVALID, describe_invalid


class _Embedder:
    """One per actor: the bundle loaded once, then one pyarrow batch at a time."""

    def __init__(self, bundle: str, variant: str, column: str, threads: int, on_invalid: str,
                 output_column: str, prompt: str | None, prompt_name: str | None):
        self.bundle = Bundle.load(bundle, variant=variant, threads=threads)
        self.column, self.on_invalid, self.output_column = column, on_invalid, output_column
        self.prompt, self.prompt_name = prompt, prompt_name

    def __call__(self, batch):
        import pyarrow as pa

        values = batch.column(self.column).to_pylist()
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad and self.on_invalid == "error":
            raise ValueError(f"column {self.column!r}: {describe_invalid(values[bad[0]], self.column)} in a row "
                             "of this batch (on_invalid='skip' or 'empty' to go on)")
        if bad and self.on_invalid == "skip":
            keep = np.ones(len(values), dtype=bool)
            keep[bad] = False
            batch = batch.filter(pa.array(keep))
            values = [v for v in values if isinstance(v, str)]
        else:
            values = [v if isinstance(v, str) else "" for v in values]
        emb = self.bundle.encode(values, prompt=self.prompt, prompt_name=self.prompt_name)
        return batch.append_column(self.output_column, embedding_column(emb))


def embed(dataset, bundle: str, column: str = "text", *, variant: str | None = None, batch_size: int = 4096,
          concurrency: int | None = None, num_cpus: float = 1, on_invalid: str = "error",
          output_column: str = "embedding", prompt: str | None = None, prompt_name: str | None = None):
    """dataset with an `output_column` of embeddings of `column` (lazy, like every Ray Data step).

    bundle: a path every node sees. variant: None picks it here, on the driver, once.
    concurrency: actors (None: the cluster's CPUs / num_cpus, less one: actors on every CPU starve the
    read and write tasks). Pass concurrency below that too. num_cpus: CPUs per actor,
    also its intra-op threads. on_invalid: a null or non-text row raises ("error"), is dropped
    ("skip") or embedded as "" ("empty")."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid {on_invalid!r}: expected error, skip or empty")
    if variant is None:
        variant = Bundle.load(bundle).variant
    if concurrency is None:  # one actor fewer than the CPUs allow: actors holding every CPU leave none for the
        import ray           # read and write tasks, and the dataset stalls

        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus) - 1)
    return dataset.map_batches(
        _Embedder, batch_format="pyarrow", batch_size=batch_size, concurrency=concurrency, num_cpus=num_cpus,
        fn_constructor_kwargs={"bundle": str(bundle), "variant": variant, "column": column,
                               "threads": max(1, int(num_cpus)), "on_invalid": on_invalid,
                               "output_column": output_column, "prompt": prompt, "prompt_name": prompt_name})


def run_cli(args) -> None:
    """`sbert-bundle ray-encode`: Parquet in, Parquet shards out."""
    try:
        import ray
    except ImportError:
        raise ImportError("ray-encode needs Ray Data: pip install 'sbert-bundle[cpu,corpus,cluster]'") from None
    import pyarrow.parquet as pq

    if not str(args.input).startswith(("s3://", "gs://")) and os.path.exists(args.input):
        names = pq.ParquetDataset(args.input).schema.names
        if args.column not in names:
            raise ValueError(f"{args.input} has no column {args.column!r}; its columns: {', '.join(names)}")
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False, logging_level="WARNING")
    try:
        dataset = ray.data.read_parquet(args.input)
        out = embed(dataset, args.bundle, column=args.column, variant=args.variant, batch_size=args.batch_rows,
                    concurrency=args.concurrency, num_cpus=args.num_cpus, on_invalid=args.on_invalid)
        out.write_parquet(args.output)
        rows = ray.data.read_parquet(args.output).count()
        print(f"wrote {rows} embeddings to {args.output}", file=sys.stderr)
    finally:
        ray.shutdown()
