"""Integrity of a teacher cache: every shard against the size and SHA-256 its manifest recorded.

``sakd cache-teacher --verify DIR`` checks all shards and names each bad one; training checks each shard
the first time it opens it (:class:`~sakd.teacher.cache.reader.CacheReader`) and refuses a bad one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sakd.teacher.cache.manifest import read_manifest


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def shard_problem(root: Path, record: dict[str, Any], *, hash_it: bool = True) -> str | None:
    """What is wrong with one shard (missing, truncated or extended, altered), or None when it matches."""
    path = root / record["file"]
    if not path.is_file():
        return f"{record['file']}: missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        kind = "truncated" if size < record["bytes"] else "longer than recorded"
        return f"{record['file']}: {kind} ({size} of {record['bytes']} bytes)"
    if hash_it and file_sha256(path) != record["sha256"]:
        return f"{record['file']}: altered (its SHA-256 differs from the manifest's)"
    return None


def verify_cache(root: str | Path) -> tuple[dict[str, Any], list[str]]:
    """The manifest and the list of problems (empty: every shard matches)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = [p for r in manifest["shards"] if (p := shard_problem(root, r)) is not None]
    return manifest, problems
