"""Content digests of model files and folders, for the caches keyed by what a model holds.

Every byte is read: a same-size edit that keeps the file's mtime (`cp -p`, `rsync -t`) must change the
digest, so no name, size or time stands in for the content. sha256 streams at about 1-2 GB/s on one core;
docs/workflow.md gives the cost on a full-size checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_digest(path: Path) -> str:
    """sha256 of a file; for a folder, of every file at any depth: its path inside the folder and its sha256."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = [[p.relative_to(path).as_posix(), file_sha256(p)] for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
