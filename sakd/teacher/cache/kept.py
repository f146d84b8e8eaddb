"""A conversations cache stores the teacher's signal only where it carries KD (``SignalSpec.positions=kd``):
which positions those are, and the line ``sakd cache-teacher`` prints on the bytes that saved."""

from __future__ import annotations

from typing import Any

import torch

from sakd.data import make_batch


def kd_positions(rows: dict[str, torch.Tensor], packing: str) -> torch.Tensor:
    """``[b, L]`` bool: the positions of conversation blocks that carry KD for some student -- for one with
    the teacher's tokenizer and template (reading these very blocks), those whose next token is a target
    (the labels of :func:`sakd.data.make_batch`, as a live run builds them); for one aligned on the
    contents, those whose token ends inside a KD-carrying content (``content_kd``)."""
    positions = rows["position"] if packing == "within_document" else None
    labels = make_batch(
        rows["input_ids"], [0] * len(rows["input_ids"]), positions=positions, targets=rows["target"]
    )["labels"]
    out = rows["content_kd"].bool().clone()
    out[:, :-1] |= labels[:, 1:] != -100
    return out


def saved_line(manifest: dict[str, Any]) -> str:
    """One line on the positions stored and, for a conversations cache, the bytes that saved."""
    t, positions = manifest["totals"], manifest["layout"]["positions"]
    if "bytes_saved" not in t:
        return f"cache-teacher: every position stored ({positions:,}), {t['bytes']:,} bytes"
    every = max(t["bytes_all_positions"], 1)
    return (
        f"cache-teacher: stored the {t['stored_positions']:,} of {positions:,} positions that carry KD, "
        f"{t['bytes']:,} bytes: {t['bytes_saved']:,} bytes "
        f"({t['bytes_saved'] / every:.0%}) saved vs every position ({t['bytes_all_positions']:,})"
    )
