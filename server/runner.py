"""Run an ASGI app under a real uvicorn server on a background thread (tests, benchmarks).

Example:
    >>> from server.runner import BackgroundServer
    >>> with BackgroundServer(app) as srv:          # binds 127.0.0.1 on a free port
    ...     openai.OpenAI(base_url=srv.url + "/v1", api_key="-").models.list()

The socket is bound before the thread starts, so the port is known at once and
cannot be taken by someone else in between; ``__exit__`` asks uvicorn to exit
(which runs the app's shutdown, stopping its worker) and joins the thread.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from autopatch.errors import ServerError


class BackgroundServer:
    """uvicorn serving ``app`` on ``host`` (loopback by default) in a daemon thread.

    ``uvicorn_options`` go to :class:`uvicorn.Config` (e.g. ``timeout_keep_alive=1``).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **uvicorn_options):
        # proto=IPPROTO_TCP, not the default 0: asyncio turns Nagle off (TCP_NODELAY) only on connections whose
        # socket says TCP, as the sockets uvicorn.run binds do. Without it, a response's body waited for the
        # client's delayed ACK of its headers: 40 ms on every request after a connection's first.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", **uvicorn_options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServerError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
