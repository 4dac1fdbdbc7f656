"""The same app under Ray Serve: one replica per Ray actor, each loading the bundle itself.

    from ray import serve
    from sbert_bundle.serve import Settings
    from sbert_bundle.serve.ray_serve import deployment

    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(deployment("/shared/minilm", Settings(api_keys=("k",)), num_replicas=4,
                         ray_actor_options={"num_cpus": 2}).bind(), route_prefix="/")

Needs `pip install 'sbert-bundle[cpu,serve]' 'ray[serve]'` on every node, and the bundle at a
path every node sees (or an archive each replica can read). Ray Serve's proxy does the routing
and the replicas' lifecycle; each replica runs `create_app`'s routes, queue and limits, so a
response is the same as from `sbert-bundle serve`. Drain on SIGTERM is Ray Serve's
(graceful_shutdown_timeout_s), not the CLI's.
"""

from __future__ import annotations

from pathlib import Path

from .app import Settings


def deployment(bundle: str | Path, settings: Settings | None = None, variant: str | None = None,
               threads: int | None = None, name: str = "sbert-bundle", **options):
    """A Ray Serve deployment serving `bundle`; options go to `serve.deployment` (num_replicas,
    ray_actor_options, max_ongoing_requests, autoscaling_config, ...). `.bind()` it and
    `serve.run` the result."""
    from ray import serve

    source = str(bundle)

    def build_app():  # runs on each replica: the bundle is loaded there, not pickled from here
        from ..bundle import Bundle
        from .app import create_app

        return create_app(Bundle.load(source, variant=variant, threads=threads), settings)

    @serve.deployment(name=name, **options)
    @serve.ingress(build_app)
    class SbertBundle:
        pass

    return SbertBundle
