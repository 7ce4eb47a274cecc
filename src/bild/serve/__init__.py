"""`bild serve`: the OpenAI-compatible HTTP server."""

from bild.extras import require

require("serve", "bild serve")

from bild.serve.app import create_app  # noqa: E402  (after the extra check)
from bild.serve.runner import DrainingServer, run  # noqa: E402

__all__ = ["DrainingServer", "create_app", "run"]
