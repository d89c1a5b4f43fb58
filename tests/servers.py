"""Real servers on loopback for remote-storage tests: a threaded HTTP server that serves a folder or forwards
to an upstream (moto's S3 server), with faults injected at the server, and moto's standalone S3 server.

Faults are planned per path substring and consumed one per matching request, in order:
  ``503``      answer 503 Service Unavailable
  ``drop``     send the headers (full Content-Length) and half the body, then cut the connection
  ``slow:S``   wait S seconds before answering
  ``503*``     answer 503 to every matching request (a shard that keeps failing)
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.ports import free_port


class _Handler(BaseHTTPRequestHandler):
    server: FaultyServer

    def log_message(self, *args) -> None:  # quiet
        pass

    def _handle(self) -> None:
        srv = self.server
        body_in = (
            self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command in ("PUT", "POST") else b""
        )
        with srv.lock:
            srv.requests.append((self.command, self.path))
        fault = srv.take_fault(self.path) if self.command == "GET" else None  # faults hit data reads
        if fault and fault.startswith("slow:"):
            time.sleep(float(fault[5:]))
        if fault in ("503", "503*"):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status, headers, body = srv.upstream_response(self, body_in) if srv.upstream else srv.file_response(self)
        self.send_response(status)
        length = str(len(body))
        for k, v in headers:
            if k.lower() == "content-length" and self.command == "HEAD":
                length = v  # a HEAD answer announces the object's length without a body
            elif k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", length)
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "drop" and len(body) > 1:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path | None = None, upstream: str | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.upstream = root, upstream
        self.requests: list[tuple[str, str]] = []
        self.faults: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def plan(self, path_part: str, *faults: str) -> None:
        self.faults.setdefault(path_part, []).extend(faults)

    def take_fault(self, path: str) -> str | None:
        with self.lock:
            for part, queue in self.faults.items():
                if part in path and queue:
                    return queue[0] if queue[0].endswith("*") else queue.pop(0)
        return None

    def gets(self, part: str) -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == "GET" and part in p)

    def file_response(self, handler: _Handler):
        path = self.root / handler.path.split("?")[0].lstrip("/")
        if not path.is_file():
            return 404, [], b""
        data = path.read_bytes()
        headers = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(data)))]
        return 200, headers, b"" if handler.command == "HEAD" else data

    def upstream_response(self, handler: _Handler, body: bytes):
        host, port = self.upstream.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("connection",)}
        conn.request(handler.command, handler.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, resp.getheaders(), data

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class MotoServer:
    """moto's standalone S3 server (``moto_server``) as a subprocess on a loopback port."""

    def __enter__(self) -> MotoServer:
        self.port = free_port()
        exe = Path(sys.executable).parent / "moto_server"
        self.proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 600  # (a server that never starts; a loaded machine is slow)
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("moto_server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", **CREDENTIALS)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def s3_env(endpoint: str) -> dict:
    """What a user of an S3-compatible store sets: credentials and the endpoint."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def with_env(env: dict):
    """Context manager setting environment variables in this process (for in-process loaders)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return ctx()
