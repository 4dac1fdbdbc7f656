"""HTTP serving of a bundle (`pip install 'sbert-bundle[cpu,serve]'`): `create_app(bundle, settings)`
builds the ASGI app; `sbert-bundle serve` runs it on uvicorn. The runtime never imports this package."""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
