"""The manifest of an offline teacher cache: what is stored (:class:`SignalSpec`), from which teacher,
tokenizer and documents, and every shard with its size and SHA-256. ``manifest.json`` is written last, by
rank 0, once every shard is on disk: its presence marks a complete cache. While a cache is being written,
``plan.json`` holds the same header (no shards) so that an interrupted run resumes only with the same
recipe, and each finished shard has a small ``shards/shard-NNNNN.json`` record.

Layout of a cache directory::

    DIR/manifest.json                    format, teacher, tokenizer, data, signal, layout, shards, totals
    DIR/shards/shard-00000.safetensors   blocks [0, blocks_per_shard) of the teacher's packed text
    DIR/shards/shard-00001.safetensors   ...
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sakd.errors import DataError

FORMAT = "sakd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "plan.json"
SHARD_DIR = "shards"
MODES = ("topk", "topk_tail", "sampled")


@dataclass(frozen=True)
class SignalSpec:
    """What every position of the cache holds and how it is encoded.

    Attributes:
        mode: ``topk`` | ``topk_tail`` | ``sampled``.
        top_k: ids per position (top-k modes), else None.
        num_samples: draws per position (sampled), else None.
        temperature: the stored log-probs are ``log_softmax(z / temperature)``.
        values_dtype: ``float16`` | ``bfloat16`` | ``float32`` for log-probs (the tail is always float32).
        vocab_size: the teacher tokenizer's length; ids are ``< vocab_size``.
        index_bits: bits per stored id (``ceil(log2 vocab_size)``).
        block_size: teacher tokens per block (the teacher saw each block as one sequence).
        router_shape: ``[layers, experts]`` of the stored router probabilities, or None.
        seed: the sampled mode's seed, else None.
        positions: ``all`` -- every position holds the signal; ``kd`` (conversations) -- only the positions
            that carry KD for some student (assistant content, :mod:`sakd.data.chat_pair`), marked per
            position in the shard (``kept``); the others hold a placeholder a run never reads.
    """

    mode: str
    top_k: int | None
    num_samples: int | None
    temperature: float
    values_dtype: str
    vocab_size: int
    index_bits: int
    block_size: int
    router_shape: list[int] | None = None
    seed: int | None = None
    positions: str = "all"

    @property
    def slots(self) -> int:
        """Id slots per position once decoded (``top_k``, or ``num_samples`` with count-0 padding)."""
        return int(self.top_k if self.mode != "sampled" else self.num_samples)

    @property
    def count_dtype(self) -> str:
        """Dtype of the sampled mode's counts (and of its per-position slot counts)."""
        return "uint8" if (self.num_samples or 0) <= 255 else "uint16"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> SignalSpec:
        return SignalSpec(**d)


def shard_file(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def shard_record_file(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.json"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    os.replace(tmp, path)


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the cache at ``root``; a missing, incomplete, foreign or newer one is one line."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise DataError(f"teacher cache not found: {root} (write one with `sakd cache-teacher`)")
    if not path.is_file():
        hint = (
            " (an unfinished run: rerun `sakd cache-teacher` to resume it)"
            if (root / PLAN_FILE).is_file()
            else ""
        )
        raise DataError(f"{root} is not a complete teacher cache: it has no {MANIFEST_FILE}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a sakd teacher cache manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{root} has cache format version {version}; this sakd reads version {FORMAT_VERSION} "
            "(regenerate the cache with this version)"
        )
    return manifest


def first_difference(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key (in ``expected``'s order) whose value differs, or None."""
    for key, want in expected.items():
        got = found.get(key)
        if isinstance(want, dict) and isinstance(got, dict):
            sub = first_difference(want, got, f"{prefix}{key}.")
            if sub is not None:
                return sub
        elif want != got:
            return f"{prefix}{key}"
    return None


def lookup(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
