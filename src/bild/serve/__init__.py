"""`bild serve`: the OpenAI-compatible HTTP server."""

from bild.serve.app import create_app

__all__ = ["create_app"]
