"""Opening shard URLs: local files, ``pipe:`` commands (webdataset's gopen) and remote object storage
(``http(s)://``, ``s3://``, ``gs://``) through fsspec, with timeouts and a classification of transient errors.

Credentials and endpoints come from the usual places of each backend (s3fs: ``AWS_*`` variables and
``~/.aws``, ``AWS_ENDPOINT_URL`` for S3-compatible stores; gcsfs: Google's default credentials); clipkit adds
only timeouts so that a dead connection raises instead of hanging. s3fs and gcsfs are optional extras
(``pip install 'clipkit[s3]'`` / ``'clipkit[gcs]'``); a missing one is reported when the spec is checked.
"""

from __future__ import annotations

import importlib.util
import io
import os
import tarfile
import time
from pathlib import Path

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://", "gcs://")
_BACKEND = {"s3": ("s3fs", "clipkit[s3]"), "gs": ("gcsfs", "clipkit[gcs]"), "gcs": ("gcsfs", "clipkit[gcs]")}
_BACKEND.update(http=("aiohttp", "aiohttp"), https=("aiohttp", "aiohttp"))
# Seconds a connection may stay silent before the read fails (and is retried); CLIPKIT_REMOTE_TIMEOUT_S, and never
# more than data.stall_timeout_s in the process that plans (``configure``).
READ_TIMEOUT_S = float(os.environ.get("CLIPKIT_REMOTE_TIMEOUT_S", "60"))


class RemoteReadError(OSError):
    """A small remote file (sizes.json, _stats.json) that could not be read in time: one line naming the URL."""


def configure(stall_timeout_s: float) -> None:
    """Bounds every remote read of this process by ``data.stall_timeout_s`` (0: no bound beyond the default)."""
    global READ_TIMEOUT_S
    if stall_timeout_s > 0:
        READ_TIMEOUT_S = min(READ_TIMEOUT_S, stall_timeout_s)


BLOCK_SIZE = 8 << 20  # bytes per ranged read (s3/gs) and read-ahead buffer


def local_path(url: str) -> Path:
    """The file of a local shard URL (a path, or ``file://``)."""
    return Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_SCHEMES)


def is_pipe(url: str) -> bool:
    return url.startswith("pipe:")


def scheme(url: str) -> str:
    return url.split("://", 1)[0]


def check_scheme(url: str) -> None:
    """Raises ``ValueError`` naming the package to install when the backend of ``url`` is missing."""
    module, extra = _BACKEND[scheme(url)]
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{scheme(url)}:// shards need {module}: pip install '{extra}'")


def _filesystem(url: str):
    import fsspec

    kind = scheme(url)
    if kind in ("http", "https"):
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, connect=READ_TIMEOUT_S, sock_read=READ_TIMEOUT_S)
        return fsspec.filesystem("http", client_kwargs={"timeout": timeout}, skip_instance_cache=True)
    if kind == "s3":
        once = {"mode": "standard", "total_max_attempts": 1}  # (legacy mode reads max_attempts=1 as one retry)
        config = {"connect_timeout": READ_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S, "retries": once}
        kwargs = {"config_kwargs": config, "skip_instance_cache": True}
        if os.environ.get("AWS_ENDPOINT_URL"):  # S3-compatible stores (MinIO, R2, Ceph, a test server)
            kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        fs = fsspec.filesystem("s3", **kwargs)
        fs.retries = 1  # one retry policy, clipkit's (counted, data.remote_retries), not s3fs's unseen one
        return fs
    return fsspec.filesystem(kind, skip_instance_cache=True)


def open_stream(url: str):
    """A readable binary stream of one shard. Remote streams are read sequentially (HTTP without ranges;
    s3/gs in ``BLOCK_SIZE`` ranged reads); ``pipe:`` runs the command (webdataset's gopen)."""
    if is_pipe(url):
        gopen = importlib.import_module("webdataset.gopen").gopen  # (the package re-exports the function as gopen)
        return gopen(url)
    if not is_remote(url):
        return open(local_path(url), "rb")
    fs = _filesystem(url)
    if scheme(url) in ("http", "https"):
        # One streaming GET (size=1 skips fsspec's HEAD probe, which reports any failure, a 503 too, as missing).
        return io.BufferedReader(fs.open(url, "rb", block_size=0, size=1), buffer_size=1 << 20)
    return fs.open(url, "rb", block_size=BLOCK_SIZE, cache_type="readahead")


def read_small(url: str, attempts: int = 3) -> str | None:
    """The text of a small remote file (sizes.json, _stats.json); None if it does not exist. Transient errors
    are retried while the whole read stays within ``READ_TIMEOUT_S`` (a server that accepts the connection and
    never answers costs that long, not attempts x timeouts); then ``RemoteReadError`` names the URL."""
    deadline = time.monotonic() + READ_TIMEOUT_S
    for attempt in range(attempts):
        try:
            with open_stream(url) as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None
        except Exception as err:
            if not is_transient(err) or attempt == attempts - 1 or time.monotonic() + 0.5 * 2**attempt > deadline:
                raise RemoteReadError(
                    f"{url}: {type(err).__name__} {str(err)[:200]} (no answer within {READ_TIMEOUT_S:g} s: "
                    "data.stall_timeout_s bounds it)"
                ) from None
            time.sleep(0.5 * 2**attempt)
    return None


def is_transient(err: BaseException) -> bool:
    """Whether a read error is worth retrying: connection resets, timeouts, HTTP 5xx / 429, throttling.
    A missing file, a refused permission and a corrupt tar are not."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, tarfile.TarError, ValueError)):
        return False
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code >= 500 or code == 429 or response.get("Error", {}).get("Code") in ("SlowDown", "Throttling")
    text = f"{type(err).__name__}: {err}"
    if any(s in text for s in (" 500", " 502", " 503", " 504", "Service Unavailable", "Internal Server Error")):
        return True
    names = {t.__name__ for t in type(err).__mro__}
    transient_types = {
        "ConnectionError",
        "TimeoutError",
        "ClientError",  # aiohttp (payload, connection, disconnect)
        "ClientPayloadError",
        "ServerDisconnectedError",
        "IncompleteRead",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "HTTPClientError",
    }
    return bool(names & transient_types) or (isinstance(err, OSError) and not isinstance(err, tarfile.TarError))
