"""Local paths and ``fsspec`` URLs (``s3://``, ``gs://``, ``hf://``, ``memory://``...) alike.

A path with ``://`` goes through ``fsspec``; anything else is a local path and goes through
the standard library, so that local data never depends on ``fsspec``'s behaviour.

Credentials never appear in a path or in ``config.yaml`` (which is saved with every run and
its checkpoints): each ``fsspec`` backend finds them itself, from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_PROFILE`` for ``s3://``, ``GOOGLE_APPLICATION_CREDENTIALS`` for
``gs://``, ``HF_TOKEN`` for ``hf://``), from its own files (``~/.aws/credentials``...), or from
``fsspec``'s configuration (``FSSPEC_S3_KEY``-style variables or ``~/.config/fsspec/*.json``,
see fsspec's "Configuration" docs). :func:`url_problem` refuses a URL that carries a password,
and the data code logs only the URLs it was given.
"""

from __future__ import annotations

import glob
from typing import IO, Any, cast
from urllib.parse import urlsplit


def is_url(path: str) -> bool:
    """True for ``protocol://...`` paths, which ``fsspec`` opens."""
    return "://" in path


def url_problem(path: str, key: str) -> str | None:
    """Why ``path`` (the config value of ``key``) must not be used, or None."""
    if not is_url(path):
        return None
    parts = urlsplit(path)
    if parts.password is not None or (parts.username and "@" in parts.netloc):
        return (
            f"{key}: {parts.scheme}://...@{parts.hostname}: the URL carries credentials, which "
            "would be saved in config.yaml and the checkpoints; remove them and provide them "
            "through the environment or fsspec's configuration (see README, 'Data at scale')."
        )
    return None


def filesystem(path: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL or a local path."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def expand(pattern: str) -> list[str]:
    """Files matching ``pattern`` (sorted), as URLs again when ``pattern`` is one."""
    if not is_url(pattern):
        return sorted(glob.glob(pattern, recursive=True))
    fs, inner = filesystem(pattern)
    found = fs.glob(inner) if any(c in inner for c in "*?[") else [inner]
    return sorted(fs.unstrip_protocol(p) for p in found if fs.isfile(p))


def open_binary(path: str, compressed: bool = False) -> IO[bytes]:
    """A binary file object of a URL or a local path; with ``compressed``, a ``.gz``/``.zst``
    URL is decompressed (then it cannot seek)."""
    if not is_url(path):
        return open(path, "rb")  # noqa: SIM115 - the caller closes it
    import fsspec

    compression = "infer" if compressed else None
    return cast(IO[bytes], fsspec.open(path, "rb", compression=compression).open())


def read_range(path: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of a file: one ranged GET on an object store."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, inner = filesystem(path)
    return cast(bytes, fs.cat_file(inner, start=start, end=end))
