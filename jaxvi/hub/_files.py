"""The files of a hub directory: their names, the error for a missing one, and the writes and
downloads that fill the directory (each through a temporary file, so a failure leaves no
partial file behind)."""

from __future__ import annotations

import os
import re
import shutil
import urllib.request

from jaxvi import io

__all__ = [
    "CARD_FILE",
    "LARGE_TRAINING_ADATA_FILE",
    "METADATA_FILE",
    "HubFileNotFoundError",
    "download",
    "files_under",
    "validate_url_format",
    "write_text",
]

METADATA_FILE = "_scvi_required_metadata.json"
CARD_FILE = "README.md"
LARGE_TRAINING_ADATA_FILE = "large_training_adata.h5ad"


class HubFileNotFoundError(FileNotFoundError, ValueError):
    """A hub file is missing. Also a ``ValueError``: scvi-tools raises ``ValueError`` where
    jaxvi raised ``FileNotFoundError``, and callers of either keep working."""


_URL = re.compile(r"^(?:https?|ftps?)://[^\s/?#]+(?:[/?#]\S*)?$", re.IGNORECASE)


def validate_url_format(url: str) -> str:
    """``url`` if it looks like an http(s) or ftp(s) URL, else ``ValueError``.

    Only the form is checked: unlike scvi-tools, which also sends a GET request to the URL,
    nothing is fetched.
    """
    if not isinstance(url, str) or _URL.match(url) is None:
        raise ValueError(f"Invalid URL format: {url}")
    return url


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    io.atomic_write(path, lambda tmp: _write(tmp, text))


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def files_under(folder: str) -> list[str]:
    """Paths (with ``/``) of the files under ``folder``, hidden files and folders left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                rel = os.path.relpath(os.path.join(root, name), folder)
                out.append(rel.replace(os.sep, "/"))
    return out


def download(url: str, path: str, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``path`` (through a temporary file, so a failed download leaves
    nothing behind)."""
    validate_url_format(url)  # http(s) or ftp(s) only: urlopen would also open file: URLs
    with urllib.request.urlopen(url, timeout=timeout) as response:
        io.atomic_write(path, lambda tmp: _copy_to(response, tmp))


def _copy_to(response, tmp: str) -> None:
    with open(tmp, "wb") as f:
        shutil.copyfileobj(response, f)
