"""Corpus jobs: `sbert-bundle encode` on inputs of any size (job, sources, sinks) and Ray Data on a
cluster (ray_data). Consumer side: imports the runtime, never the reverse; every embedding is
what `Bundle.encode` gives."""
