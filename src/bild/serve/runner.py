"""Running the app under uvicorn, with a shutdown that ends every request in-band instead of cutting it off."""

from __future__ import annotations

import uvicorn
from fastapi import FastAPI

GRACE_S = 2.0  # after the app has ended its requests: time for their last bytes to reach the clients


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the bild app when shutdown begins.

    On SIGTERM uvicorn stops accepting connections, waits `timeout_graceful_shutdown` for the requests in flight and
    then cancels their tasks, which cuts a stream off mid-body. Here the app gets `shutdown_timeout_s` to finish,
    then ends what still runs itself (`_Server.begin_shutdown`: an error event and [DONE] for a stream, 503 with
    Retry-After for the rest); uvicorn's own timeout comes `GRACE_S` later, for the last bytes to go out.
    """

    def __init__(self, app: FastAPI, shutdown_timeout_s: float, **uvicorn_options) -> None:
        if shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {shutdown_timeout_s}")
        config = uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout_s + GRACE_S, **uvicorn_options)
        super().__init__(config)
        self.bild = app.state.bild
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets=None) -> None:
        self.bild.begin_shutdown(self.shutdown_timeout_s)
        await super().shutdown(sockets)


def run(app: FastAPI, host: str, port: int, shutdown_timeout_s: float = 10.0, log_level: str = "info") -> bool:
    """Serve until SIGINT/SIGTERM; False when the server could not start (e.g. the port is taken)."""
    server = DrainingServer(app, shutdown_timeout_s, host=host, port=port, log_level=log_level)
    server.run()
    return server.started
