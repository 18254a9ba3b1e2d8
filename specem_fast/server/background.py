"""Run the app with uvicorn on a background thread (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

# seconds uvicorn waits past the app's own shutdown deadline before it cancels what is left
SHUTDOWN_BACKSTOP = 5.0


class BackgroundServer:
    """``with BackgroundServer(app) as srv: srv.url`` serves ``app`` on 127.0.0.1 (a free
    port unless one is given) until the block ends. :meth:`stop` shuts down as
    ``specem-fast serve`` does on SIGTERM: the app's ``begin_shutdown(shutdown_timeout)``
    (requests still running after ``shutdown_timeout`` seconds are answered with a
    shutdown error), then uvicorn's graceful shutdown."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 shutdown_timeout: float = 5.0):
        import uvicorn

        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                                    timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_BACKSTOP))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="specem-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        t_end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > t_end:
                raise RuntimeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def begin_shutdown(self) -> None:
        """Start shutting down without waiting: the app's grace period, then uvicorn's shutdown."""
        begin = getattr(getattr(self.app, "state", None), "begin_shutdown", None)
        if begin is not None:
            begin(self.shutdown_timeout)
        self.server.should_exit = True

    def stop(self, timeout: float = 60.0) -> None:
        self.begin_shutdown()
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
