"""Documents inside a packed block: the *document mask*, which keeps attention inside each document.

A block packed ``within_document`` carries, as its ``attention_mask``, one integer per token: the 1-based
index of the document (or piece of a document) it belongs to inside the row, 0 for padding
(``[[1, 1, 1, 2, 2, 3, 0, 0]]``). Everything that reads the mask as "is this a real token" (``.bool()``)
keeps working, and :func:`sakd.models.capture.capture` turns it into ``position_ids`` that restart at 0 at
each document start: transformers then builds a block-diagonal causal mask (sdpa, eager, flex) or runs
flash-attention's varlen kernel, so no token attends across a document boundary and each document sees
the positions it would see alone. A plain 0/1 mask is a document mask with one document per row.

A block that starts inside a document starts that document's piece at position 0: its tokens see only
the part in this block, exactly as if the piece were run alone.
"""

from __future__ import annotations

import torch


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` document indices (1, 2, ...) from each token's index inside its document (0 starts one;
    a row's first token always starts one)."""
    starts = positions == 0
    starts[:, 0] = True
    return starts.long().cumsum(dim=1)


def is_document_mask(mask: torch.Tensor | None) -> bool:
    """Whether ``mask`` separates several documents in some row (a value above 1)."""
    return (
        mask is not None and mask.dim() == 2 and not mask.dtype.is_floating_point and bool((mask > 1).any())
    )


def document_positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position ids that restart at 0 where the document index changes (and at padding, which
    must be on the right: causal attention keeps it out of every real token)."""
    if bool(((mask[:, 1:] > 0) & (mask[:, :-1] == 0)).any()):
        raise ValueError("a document mask must be right-padded (0 only after the last document of a row)")
    b, n = mask.shape
    at = torch.arange(n, device=mask.device).expand(b, n)
    start = torch.ones_like(mask, dtype=torch.bool)
    start[:, 1:] = mask[:, 1:] != mask[:, :-1]
    first = torch.where(start, at, torch.zeros_like(at)).cummax(dim=1).values
    return at - first
