"""Fused, chunked linear head + cross-entropy, summed over positions, with its gradient in closed form.

The cross-entropy-only objective (``alpha: 0``, a CE baseline, teacher pretraining) used to take its
gradient by autograd over chunks of logits rebuilt in backward under activation checkpointing: every chunk's
head matmul and log-softmax ran twice, and the log-softmax's backward a third pass over ``[chunk, V]``.
Here the forward walks the chunks once, as :mod:`sakd.losses.chunk_loop` does for the KD losses: a chunk's
logits, its per-position CE and ∂CE/∂logits = ``softmax(z) − ((1−ε)·onehot(y) + ε/V)``
(:func:`sakd.losses.logit_grads.ce_rows_and_grad`, a block of rows at a time), then the gradients of the
chunk's hidden states and of the head right away; backward only scales them. Same formula as
:func:`sakd.losses.cross_entropy.cross_entropy_per_position`, so the value equals the unfused one up to
float rounding (checked, with the gradients, against ``torch.nn.functional.cross_entropy`` in
``tests/test_losses_fused_ce.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .chunked import Head
from .logit_grads import block_rows, ce_rows_and_grad
from .reduction import compute_dtype
from .stored_grads import kept_dtype, upstream_scaled, zero_grads


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_size):
        dtype = compute_dtype(hidden.dtype)
        grads = zero_grads((hidden, weight, bias), ctx.needs_input_grad[:3])
        keep = kept_dtype(hidden.dtype)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        rows_per_chunk = min(chunk_size, max(1, n_rows))
        block = block_rows(rows_per_chunk, vocab)
        scratch = torch.empty(block, vocab, dtype=dtype, device=hidden.device)
        valid = labels != ignore_index
        total = torch.zeros((), dtype=dtype, device=hidden.device)
        starts = range(0, n_rows, rows_per_chunk)
        # chunks without a valid position are skipped; decided for all chunks with one host sync
        nonempty = (
            torch.stack([valid[s : s + rows_per_chunk].any() for s in starts]).tolist() if n_rows else []
        )
        for start, has_valid in zip(starts, nonempty, strict=True):
            if not has_valid:
                continue
            rows = slice(start, start + rows_per_chunk)
            h = hidden[rows]
            logits = F.linear(h, weight, bias).to(dtype)  # as the unfused path: upcast after the matmul
            for lo in range(0, logits.shape[0], block):
                part = slice(lo, lo + block)
                grad = scratch[: logits[part].shape[0]]
                ce = ce_rows_and_grad(
                    logits[part],
                    labels[rows][part],
                    ignore_index=ignore_index,
                    label_smoothing=label_smoothing,
                    out=grad,
                )
                total = total + ce.sum()
                logits[part].copy_(grad).mul_(valid[rows][part].unsqueeze(-1))  # ignored rows: no gradient
            g = logits.to(keep)
            if grads[0] is not None:
                grads[0][rows] = g.to(weight.dtype) @ weight  # per position: cannot overflow
            if grads[1] is not None:
                grads[1].addmm_(g.T, h.to(keep))
            if grads[2] is not None:
                grads[2] += g.sum(0)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.dtypes = tuple(
            None if g is None else t.dtype for g, t in zip(grads, (hidden, weight, bias), strict=True)
        )
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [None if dtype is None else next(saved) for dtype in ctx.dtypes]
        return (*upstream_scaled(grads, grad_total, ctx.dtypes), None, None, None, None)


def fused_linear_cross_entropy(
    hidden: Tensor,
    head: Head,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_size: int = 1024,
) -> Tensor:
    """Σ over positions of the cross-entropy of ``head.logits(hidden)`` against ``labels``, in float32 (float64
    stays float64), never holding more than ``chunk_size`` rows of logits; 0 at ``ignore_index``.

    Args:
        hidden: ``[N, H]`` hidden states.
        head: the output head (weight ``[V', H]``, optional bias; only its first ``head.vocab`` rows are
            tokens; the rest get no gradient).
        labels: ``[N]`` target ids.
        label_smoothing: ε ∈ [0, 1], as ``torch.nn.functional.cross_entropy``'s.
        chunk_size: rows of logits computed at a time (>= 1).
    """
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} must be [N, H] with labels [N], got {tuple(labels.shape)}"
        )
    weight = head.weight if head.vocab is None else head.weight[: head.vocab]
    bias = head.bias if head.bias is None or head.vocab is None else head.bias[: head.vocab]
    return _FusedLinearCE.apply(hidden, weight, bias, labels, ignore_index, label_smoothing, chunk_size)
