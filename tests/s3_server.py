"""A real S3 endpoint for tests and benchmarks: moto's S3 backend served over HTTP on a free local port.

s3fs talks to it through the network stack exactly as to AWS (no mocking inside the client). ``delay_s`` adds a
fixed per-request latency in the server (each request sleeps in its own server thread, so concurrent requests
overlap as they do against a real region). Used by the ``s3`` fixture in tests/conftest.py and by
benchmarks/bench_remote.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time


class S3Server:
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = float(delay_s)
        self.requests = 0
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    def _app(self):
        from moto.server import DomainDispatcherApplication, create_backend_app

        inner = DomainDispatcherApplication(create_backend_app)

        def app(environ, start_response):
            with self._lock:
                self.requests += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            return inner(environ, start_response)

        return app

    def start(self) -> S3Server:
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = make_server("127.0.0.1", 0, self._app(), threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self) -> dict:
        """Environment variables that point boto/s3fs (in this process or a child) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
                "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def apply_env(self) -> None:
        os.environ.update(self.env())

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def make_bucket(name: str) -> None:
    """Create ``name`` on the endpoint in the environment (a fresh filesystem instance: nothing cached)."""
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)


def fresh_s3fs():
    """An s3fs filesystem with no listing cache (tests look at the bucket as it is now)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
