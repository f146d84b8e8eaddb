"""The chain rule's teacher side across tokenizers: the teacher's log-prob of each of its own next tokens,
only where a student token is spelt by several teacher tokens (:func:`inside_spans`), summed over the span
by :func:`sakd.align.positions.span_logprob` in :class:`sakd.objective.composite.Objective`."""

from __future__ import annotations

import torch

from sakd.losses import Head, over_chunks, resolve_chunk_size
from sakd.models.forward import HiddenAndHead


def teacher_token_logprobs(
    teacher: HiddenAndHead,
    teacher_ids: torch.Tensor,
    temperature: float,
    needed: torch.Tensor,
    vocab_size: int,
    chunk_size: int | str,
) -> torch.Tensor:
    """``[B, Lt]``: log p_T(teacher token j+1 | prefix) at temperature T where ``needed`` ``[B, Lt]`` (0
    elsewhere), chunk by chunk, no grad. For M > 1 knowledge-augmentation samples ``[M, B, Lt]``, one row
    per sample: each augmented teacher spells the whole span, so the mixture's span probability is
    ``mean_m Π_j p_m(j)`` (:func:`sakd.align.positions.span_logprob` takes the mean over the leading dim
    after summing the span), not ``Π_j mean_m p_m(j)``. Only the positions inside a multi-token span are
    scored: the others would repeat the teacher-head matmul of the KD term for nothing."""
    head = Head(teacher.head_weight, teacher.head_bias, vocab_size)
    samples = getattr(teacher, "samples", None)
    states = [teacher.hidden] if samples is None else list(samples)
    width = states[0].shape[-1]
    rows = needed.reshape(-1).nonzero().squeeze(-1)
    nxt = torch.cat([teacher_ids[:, 1:], teacher_ids[:, -1:]], 1).reshape(-1).index_select(0, rows)
    chunk_rows = resolve_chunk_size(chunk_size, rows.numel(), (vocab_size, 0), (width, 0))
    per_sample = []
    for state in states:
        hidden = state.reshape(-1, width).index_select(0, rows)

        def chunk(r: slice, hidden: torch.Tensor = hidden) -> torch.Tensor:
            lp = torch.log_softmax(head.logits(hidden[r], upcast=True) / temperature, dim=-1)
            return lp.gather(1, nxt[r, None]).squeeze(1)

        with torch.no_grad():
            per_sample.append(over_chunks(chunk, rows.numel(), chunk_rows, combine="cat"))
    dtype = torch.promote_types(states[0].dtype, torch.float32)
    out = torch.zeros(len(per_sample), teacher_ids.numel(), dtype=dtype, device=teacher_ids.device)
    out[:, rows] = torch.stack(per_sample).to(dtype)
    out = out.reshape(len(per_sample), *teacher_ids.shape)
    return out[0] if len(per_sample) == 1 else out


def inside_spans(
    anchor: torch.Tensor, span_end: torch.Tensor, multi: torch.Tensor, length: int
) -> torch.Tensor:
    """``[B, length]`` bool: teacher positions ``j`` with ``anchor <= j < span_end`` for some student position
    where ``multi`` (the positions :func:`sakd.align.positions.span_logprob` sums over)."""
    edges = torch.zeros(anchor.shape[0], length + 1, dtype=torch.long, device=anchor.device)
    sink = torch.full_like(anchor, length)  # unused spans open and close in the extra column
    edges.scatter_add_(1, torch.where(multi, anchor, sink), torch.ones_like(anchor))
    edges.scatter_add_(1, torch.where(multi, span_end, sink), -torch.ones_like(anchor))
    return edges.cumsum(1)[:, :length] > 0
