"""Object storage: stores and inputs at fsspec URLs (``s3://``, ``gs://``, ``az://``, ``memory://``...).

A path with a scheme other than ``file://`` is a URL; everything else stays a local path with its memory-mapped,
``rename``-based fast path. Filesystems come from fsspec (s3fs for S3, gcsfs, adlfs), configured the usual way:
credentials and endpoint through the backend's environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``...) or ``storage_options`` (a dict, or JSON in ``LABELSTORE_STORAGE_OPTIONS``). No message
labelstore prints ever contains a storage option's value (:func:`redact`).

Every call to the object store goes through :func:`call`: transient failures (connection resets, timeouts,
throttling, 5xx) are retried with exponential backoff and jitter; permanent ones (no such bucket, access denied)
raise :class:`~labelstore.errors.RemoteStorageError` at once, naming the URL and what to do.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from functools import lru_cache

from labelstore.errors import RemoteStorageError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OPTIONS_ENV = "LABELSTORE_STORAGE_OPTIONS"
RETRIES = 6  # attempts of one call: 0.2 s, 0.4 s ... 6.4 s of backoff, 12.6 s in all
BACKOFF_S = 0.2
_PERMANENT = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def is_url(path) -> bool:
    """True for ``scheme://...`` other than ``file://`` (a ``file://`` URL is a local path)."""
    if not isinstance(path, str):
        return False
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() not in ("file", "local")


def local_path(path) -> str:
    """``file:///x`` -> ``/x``; other paths unchanged."""
    return path[len("file://"):] if isinstance(path, str) and path.lower().startswith("file://") else path


def env_storage_options() -> dict:
    raw = os.environ.get(OPTIONS_ENV)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except ValueError:
        raise RemoteStorageError(f"{OPTIONS_ENV} is not valid JSON (its value is not shown: it may hold "
                                 "credentials); set it to a JSON object such as {\"anon\": false}") from None
    if not isinstance(opts, dict):
        raise RemoteStorageError(f"{OPTIONS_ENV} must hold a JSON object")
    return opts


def _secrets(opts: dict) -> list[str]:
    out = []
    for v in opts.values():
        if isinstance(v, dict):
            out += _secrets(v)
        elif isinstance(v, str) and len(v) >= 4:
            out.append(v)
    return out


def redact(text: str, storage_options: dict | None = None) -> str:
    """``text`` with every string value of the storage options (and the AWS secret/session token from the
    environment) replaced by ``***``."""
    vals = _secrets(dict(env_storage_options(), **(storage_options or {})))
    vals += [os.environ[k] for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
             if len(os.environ.get(k, "")) >= 4]
    for v in sorted(set(vals), key=len, reverse=True):
        text = text.replace(v, "***")
    return text


def _freeze(opts: dict) -> str:
    return json.dumps(opts, sort_keys=True, default=str)


@lru_cache(maxsize=32)
def _fs(protocol: str, frozen: str, pid: int):  # per process: a forked child (DataLoader worker) must not reuse
    # its parent's instance, whose event loop thread does not exist in the child (every call would hang)
    import fsspec

    try:
        return fsspec.filesystem(protocol, **json.loads(frozen))
    except ImportError as exc:
        pkg = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(
            protocol, f"the fsspec backend for {protocol}://")
        raise RemoteStorageError(f"{protocol}:// URLs need {pkg}: pip install {pkg} ({exc})") from None
    except ValueError as exc:
        raise RemoteStorageError(f"fsspec does not know the protocol {protocol}:// ({exc})") from None


def filesystem(url: str, storage_options: dict | None = None):
    """``(fs, path)``: the fsspec filesystem of ``url`` and the path inside it (no scheme, no trailing ``/``)."""
    m = _SCHEME.match(url)
    if m is None:
        raise ValueError(f"{url!r} is not a URL")
    protocol = m.group(1).lower()
    opts = dict(env_storage_options(), **(storage_options or {}))
    fs = _fs(protocol, _freeze(opts), os.getpid())
    return fs, fs._strip_protocol(url).rstrip("/")


def transient(exc: BaseException) -> bool:
    """Worth retrying: a connection, timeout, throttling or server-side (5xx) failure."""
    if isinstance(exc, _PERMANENT):
        return False
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Timeout" in name or "Connection" in name:
        return True
    if re.search(r"SlowDown|Throttl|RequestTimeout|InternalError|ServiceUnavailable|\b50[0-9]\b|reset by peer",
                 text):
        return True
    return isinstance(exc, OSError) and getattr(exc, "errno", None) is None and "pre-condition" not in text


def describe(exc: BaseException, url: str, action: str, storage_options: dict | None = None) -> str:
    """A one-paragraph message for a permanent failure: what failed, why, and what to do."""
    text = redact(str(exc) or type(exc).__name__, storage_options)
    if "bucket does not exist" in text or "NoSuchBucket" in text:
        hint = "the bucket does not exist: create it, or fix the URL"
    elif isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "403" in text:
        hint = ("access denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE or storage options) and the "
                "bucket policy: writing a store needs Put, Get, List and Delete on its prefix")
    elif isinstance(exc, FileNotFoundError):
        hint = "no such object"
    else:
        hint = text
    return f"{action} {url} failed: {hint} ({type(exc).__name__}: {text})"


def call(fn, *args, url: str, action: str, retries: int | None = None, storage_options: dict | None = None,
         passthrough: tuple = (), **kwargs):
    """``fn(*args, **kwargs)`` with retries on transient failures. Exceptions in ``passthrough`` (e.g.
    FileNotFoundError when absence is an answer) are re-raised as they are; other permanent failures, and
    transient ones after ``retries`` attempts (default :data:`RETRIES`, read at each call), raise
    RemoteStorageError."""
    retries = RETRIES if retries is None else retries
    for attempt in range(retries):
        try:
            return fn(*args, **kwargs)
        except passthrough:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient(exc) or attempt == retries - 1:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise RemoteStorageError(describe(exc, url, action, storage_options) + tries) from None
            time.sleep(BACKOFF_S * (2 ** attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")  # pragma: no cover


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if rel else root


def supports_conditional_writes(fs) -> bool:
    """Whether ``fs`` can create-if-absent and replace-if-unchanged atomically (S3 ``If-None-Match``/``If-Match``)."""
    return "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def put_bytes(fs, path: str, data: bytes, *, url: str, exclusive: bool = False, if_match: str | None = None,
              storage_options: dict | None = None) -> bool:
    """Write one small object. ``exclusive``: only if absent (False when it exists); ``if_match``: only if its ETag
    is still that (False when it changed). Without conditional writes (not S3) the check is a read before the
    write, which two racing writers can both pass (docs/FORMAT.md section 8)."""
    kwargs: dict = {}
    if supports_conditional_writes(fs):
        if exclusive:
            kwargs["mode"] = "create"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
    elif exclusive and fs.exists(path):
        return False
    elif if_match is not None and etag(fs, path, url=url) != if_match:
        return False
    try:
        call(fs.pipe_file, path, data, url=url, action="writing", storage_options=storage_options,
             passthrough=(FileExistsError,), **kwargs)
    except FileExistsError:
        return False
    except RemoteStorageError as exc:
        if "pre-condition" in str(exc) or "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        raise
    return True


def etag(fs, path: str, *, url: str) -> str | None:
    """The object's ETag (or, without one, its modification time), None if absent."""
    try:
        info = call(fs.info, path, url=url, action="reading", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        return None
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return str(tag) if tag is not None else None


def get_bytes(fs, path: str, *, url: str, max_bytes: int, what: str) -> bytes | None:
    """A small object's content (None if absent); one larger than ``max_bytes`` is refused unread."""
    from labelstore.errors import StoreFormatError

    try:
        info = call(fs.info, path, url=url, action=f"reading {what}", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        raise StoreFormatError(f"{what} {url} is a folder, not an object")
    if (info.get("size") or 0) > max_bytes:
        raise StoreFormatError(f"{what} {url} is {info['size']} bytes, over the {max_bytes} limit")
    try:
        data = call(fs.cat_file, path, url=url, action=f"reading {what}", passthrough=(FileNotFoundError,))
    except FileNotFoundError:
        return None
    if len(data) > max_bytes:
        raise StoreFormatError(f"{what} {url} is over the {max_bytes} limit")
    return data


__all__ = ["is_url", "filesystem", "call", "join", "put_bytes", "get_bytes", "etag", "redact", "describe",
           "supports_conditional_writes", "local_path", "OPTIONS_ENV"]


def object_identity(info: dict | None) -> dict | None:
    """An object's identity from its listing entry (``fs.info`` / ``find(detail=True)``): its size and ETag (else
    its modification time); what says it is the same object without reading it (``--plan units``)."""
    if not info:
        return None
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "LastModified", "last_modified", "mtime", "updated")
                if info.get(k) is not None), None)
    return {"bytes": info.get("size"), "etag": None if tag is None else str(tag)}
