"""Closed-form gradients of the dense losses with respect to the student logits.

Used by the fused loss's chunk loop for the dense kinds (no sparse mode, no vocab map): it
needs fewer and smaller temporaries than autograd on the same formulas, which is what lets the
chunks stay small and fast. Values still come from :func:`divergence_from_logprobs` and
:func:`cross_entropy_per_position` formulas, so they equal the unfused loss up to float
rounding; the gradients are checked against autograd by the fused tests (``gradcheck`` and
fused == unfused).

With s = log q = log_softmax(z/T) (student), t = log p (teacher) and g = ∂L/∂s per position, the
gradient with respect to z/T is ``g − q·Σ_v g_v``. Per kind (m the kind's mixture):

- fkl: L = Σ p(t − s) → grad = q − p
- rkl: L = Σ q(s − t) → grad = q·(s − t − L)
- jsd: m = βp + (1−β)q → g = (1−β)·q·(s − log m)
- skl: m = αp + (1−α)q → g = −(1−α)·p·q/m
- srkl: m = (1−α)p + αq → g = q·(s − log m − α·q/m)  (a ``+q`` term cancels in ``g − qΣg``)
- tvd: L = ½Σ|q − p| → g = ½·sign(q − p)·q

The logits here come from linear heads and are finite; the ``-inf`` handling of the general
functions is not repeated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .divergences import divergence_from_logprobs, log_mixture
from .spec import KDSpec

BLOCK_ELEMENTS = 1 << 20
"""Elements per row block of the closed-form pass (4 MiB of float32). Across vocabularies a block has a
handful of such temporaries (:mod:`sakd.losses.bucket_grads`); at 8 MiB they made 10 % of the fused loss's
peak at N = 2,048 with the real pair's heads, at 4 MiB 5 %, with no measurable change in time."""


def block_rows(rows: int, vocab: int) -> int:
    """Rows per block when splitting ``rows`` rows of ``vocab`` ids into equal blocks of at most
    :data:`BLOCK_ELEMENTS` elements (at least one row)."""
    n_blocks = max(1, -(-rows // max(1, BLOCK_ELEMENTS // vocab)))
    return max(1, -(-rows // n_blocks))


def log_softmax_(x: Tensor, temperature: float, scratch: Tensor) -> Tensor:
    """In-place ``log_softmax(x / T)`` over the last dim; ``scratch`` is a buffer of x's shape."""
    if temperature != 1.0:
        x.div_(temperature)
    top = x.amax(-1, keepdim=True)
    lse = torch.sub(x, top, out=scratch).exp_().sum(-1, keepdim=True).log_().add_(top)
    return x.sub_(lse)


def _project(g: Tensor, q: Tensor) -> Tensor:
    """In place ``g − q·Σg``: from ∂L/∂(log q) to ∂L/∂(logits)."""
    return g.addcmul_(q, g.sum(-1, keepdim=True), value=-1.0)


def effective_kind(kind: str, beta: float, skew: float) -> str:
    """The kind whose formulas apply: JSD / skew-KL endpoints are plain KLs (or identically 0)."""
    if kind == "jsd" and beta in (0.0, 1.0):
        return "fkl" if beta == 0.0 else "rkl"
    if kind in ("skl", "srkl") and skew in (0.0, 1.0):
        return "zero" if skew == 1.0 else {"skl": "fkl", "srkl": "rkl"}[kind]
    return kind


@torch.no_grad()
def kd_rows_and_grad_(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float,
    beta: float,
    skew: float,
    scratch: Tensor,
) -> Tensor:
    """Per-position divergence; overwrites ``student_logits`` with ∂divergence/∂student_logits.

    ``fkl`` and ``rkl`` allocate nothing of size ``[c, V]`` (same arithmetic as
    :func:`kl_from_logprobs` for finite logits); the other kinds take their values from
    :func:`divergence_from_logprobs` and allocate a few temporaries.

    Args:
        student_logits: ``[c, V]``, overwritten with the gradient (no T² scaling).
        teacher_logits: ``[c, V]``, overwritten (consumed).
        scratch: ``[c, V]`` buffer, overwritten.

    Returns:
        ``[c]`` divergence.
    """
    s = log_softmax_(student_logits, temperature, scratch)
    t = log_softmax_(teacher_logits, temperature, scratch)
    kind = effective_kind(kind, beta, skew)
    if kind == "fkl":
        log_ratio = torch.sub(t, s, out=scratch)
        p = t.exp_()
        rows = torch.einsum("...v,...v->...", p, log_ratio)
        s.exp_().sub_(p).div_(temperature)
        return rows
    if kind == "rkl":
        log_ratio = torch.sub(s, t, out=scratch)
        q = s.exp_()
        rows = torch.einsum("...v,...v->...", q, log_ratio)
        q.mul_(log_ratio.sub_(rows.unsqueeze(-1))).div_(temperature)
        return rows
    if kind == "zero":
        s.zero_()
        return s.new_zeros(s.shape[:-1])
    rows = divergence_from_logprobs(s, t, kind, beta=beta, skew=skew)
    q = torch.exp(s, out=scratch)
    if kind == "jsd":
        grad = log_mixture(t, s, 1.0 - beta).neg_().add_(s).mul_(q).mul_(1.0 - beta)
    elif kind == "skl":
        grad = log_mixture(t, s, 1.0 - skew).neg_().add_(t).add_(s).exp_().mul_(skew - 1.0)
    elif kind == "srkl":
        log_ratio = log_mixture(s, t, 1.0 - skew).neg_().add_(s)  # log(q/m)
        grad = log_ratio.exp().mul_(-skew).add_(log_ratio).mul_(q)
    else:  # tvd
        grad = t.exp_().neg_().add_(q).sign_().mul_(q).mul_(0.5)
    s.copy_(_project(grad, q)).div_(temperature)
    return rows


@torch.no_grad()
def ce_rows_and_grad(
    logits: Tensor, labels: Tensor, *, ignore_index: int, label_smoothing: float, out: Tensor
) -> Tensor:
    """Per-position cross-entropy (the formula of :func:`cross_entropy_per_position`, 0 at
    ignored positions); writes its gradient ``softmax(z) − ((1−ε)·onehot(y) + ε/V)`` into
    ``out`` — rows of ignored positions are left as they are: callers weight them by 0.

    ``logits``: ``[c, V]`` (not modified); ``labels``: ``[c]``; ``out``: ``[c, V]`` buffer.
    """
    top = logits.amax(-1, keepdim=True)
    exp_sum = torch.sub(logits, top, out=out).exp_().sum(-1, keepdim=True)
    lse = exp_sum.log().add_(top)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0).unsqueeze(-1)
    rows = (lse - logits.gather(-1, safe_labels)).squeeze(-1)
    if label_smoothing > 0.0:
        rows = (1.0 - label_smoothing) * rows + label_smoothing * (lse.squeeze(-1) - logits.mean(-1))
    out.div_(exp_sum)
    if label_smoothing > 0.0:
        out.sub_(label_smoothing / logits.shape[-1])
    out.scatter_add_(-1, safe_labels, torch.full_like(safe_labels, label_smoothing - 1.0, dtype=out.dtype))
    return torch.where(valid, rows, 0.0)


KDBlock = Callable[[slice, Tensor], Tensor]
"""``kd_block(rows, logits)``: the KD term of ``rows`` (a slice of the chunk) per position ``[b]``; overwrites
``logits`` (``[b, V]``, that block's student logits) with ∂KD/∂logits."""


def dense_kd_block(teacher_logits: Tensor, spec: KDSpec, scratch: Tensor) -> KDBlock:
    """The KD term on one vocabulary, dense kinds: :func:`kd_rows_and_grad_` on ``teacher_logits[rows]``."""

    def kd_block(rows: slice, logits: Tensor) -> Tensor:
        return kd_rows_and_grad_(
            logits,
            teacher_logits[rows],
            spec.kind,
            temperature=spec.temperature,
            beta=spec.beta,
            skew=spec.skew,
            scratch=scratch[: logits.shape[0]],
        )

    return kd_block


@torch.no_grad()
def blended_rows_and_grad_(
    logits: Tensor,
    labels: Tensor | None,
    coefs: tuple[Tensor, Tensor],
    kd_block: KDBlock,
    *,
    block: int,
    ignore_index: int,
    label_smoothing: float,
    ce_scratch: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """KD and CE per position; overwrites ``logits`` with ∂(Σ kd_coef·kd + ce_coef·ce)/∂logits.

    Works through blocks of ``block`` rows (:func:`block_rows`), so that its temporaries are block-sized
    (and preallocated) while the matmuls around it use large chunks.

    Args:
        logits: ``[c, V]`` student logits (float32/64), overwritten with the gradient.
        labels: ``[c]`` targets or None.
        coefs: ``([c] kd_coef, [c] ce_coef)`` per-position multipliers.
        kd_block: the KD term of a block of rows (:data:`KDBlock`).
        ce_scratch: a ``[block, V]`` buffer for the CE gradient (needed with labels).

    Returns:
        ``([c] kd, [c] ce or None)``.
    """
    kd_rows, ce_rows = [], []
    for start in range(0, logits.shape[0], block):
        rows = slice(start, start + block)
        size = logits[rows].shape[0]
        ce_grad = None
        if labels is not None:
            ce_grad = ce_scratch[:size]
            ce_rows.append(
                ce_rows_and_grad(
                    logits[rows],
                    labels[rows],
                    ignore_index=ignore_index,
                    label_smoothing=label_smoothing,
                    out=ce_grad,
                )
            )
        kd_rows.append(kd_block(rows, logits[rows]))
        logits[rows].mul_(coefs[0][rows].unsqueeze(-1))
        if ce_grad is not None:
            logits[rows].addcmul_(ce_grad, coefs[1][rows].unsqueeze(-1))
    return torch.cat(kd_rows), torch.cat(ce_rows) if ce_rows else None
