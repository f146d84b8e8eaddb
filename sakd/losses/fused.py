"""Fused, chunked linear-head + distillation loss: never materializes ``[N, V]`` logits.

The approach of Liger-Kernel's fused linear losses (Hsu et al., 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training"): the forward pass walks over chunks of ``chunk_size`` tokens,
computes that chunk's student and teacher logits, its loss, and — right away — the gradients
with respect to the chunk's student hidden states and (accumulated) the student head weight and
bias. Only ``O(chunk_size × V)`` extra memory is live at any time. The backward pass merely
scales the stored gradients by the incoming gradient.

Two ways to get a chunk's logit gradient:

- dense kinds (no sparse mode, no vocab map): closed-form gradients
  (:mod:`sakd.losses.logit_grads`) computed in place in buffers allocated once per call — the
  fast, lean path the trainer uses;
- everything else (sparse modes, vocab maps, no-grad evaluation): autograd on the chunk's small
  graph built from :func:`kd_per_position` and :func:`cross_entropy_per_position`, so these
  behave exactly like the unfused :func:`sakd.losses.distill_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blend import DistillOutput, KDSpec, check_blend, kd_per_position, valid_positions
from .cross_entropy import cross_entropy_per_position
from .logit_grads import blended_rows_and_grad_, block_rows
from .reduction import check_reduction, compute_dtype
from .sparse import SparseTeacher
from .vocab_map import check_vocab_map


@dataclass(frozen=True)
class _Plan:
    """Everything the chunk loop needs besides the differentiable tensors (all ``[N]``-leading)."""

    spec: KDSpec
    valid: Tensor
    weights: Tensor | None
    labels: Tensor | None
    sparse_teacher: SparseTeacher | None
    alpha: float
    kd_scale: float
    denominator: float
    label_smoothing: float
    ignore_index: int
    chunk_size: int
    vocab_map: Tensor | None
    teacher_to_student: Tensor | None
    kd_valid: Tensor | None
    target_logprob: Tensor | None
    generator: torch.Generator | None
    needs_grad: tuple[bool, bool, bool]

    @property
    def closed_form(self) -> bool:
        return (
            any(self.needs_grad)
            and self.spec.sparse is None
            and self.vocab_map is None
            and self.teacher_to_student is None
            and self.target_logprob is None
        )


@dataclass(frozen=True)
class _Workspace:
    """Buffers of the closed-form path, reused by every chunk: student and teacher logits
    ``[chunk, V]`` and two ``[block, V]`` scratch buffers (the second for the CE gradient)."""

    student: Tensor
    teacher: Tensor
    scratch: tuple[Tensor, Tensor | None]

    @staticmethod
    def create(plan: _Plan, n_tokens: int, s_weight: Tensor, t_weight: Tensor) -> _Workspace:
        dtype, device = compute_dtype(s_weight.dtype), s_weight.device
        rows, vocab = min(plan.chunk_size, n_tokens), s_weight.shape[0]
        block = block_rows(rows, vocab)
        return _Workspace(
            student=torch.empty(rows, vocab, dtype=dtype, device=device),
            teacher=torch.empty(rows, t_weight.shape[0], dtype=dtype, device=device),
            scratch=(
                torch.empty(block, vocab, dtype=dtype, device=device),
                None if plan.labels is None else torch.empty(block, vocab, dtype=dtype, device=device),
            ),
        )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` in the compute dtype, written into ``out[:len(x)]`` when given
    and the dtypes agree (otherwise a new tensor)."""
    if out is None or x.dtype != out.dtype or weight.dtype != out.dtype:
        return F.linear(x, weight, bias).to(compute_dtype(x.dtype))
    out = out[: x.shape[0]]
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


ChunkResult = tuple[Tensor, Tensor | None, Tensor | None]
"""Per-position KD ``[c]``, CE ``[c]`` (or None), ∂(chunk loss)/∂logits ``[c, V]`` (or None)."""


def _chunk_autograd(
    logits: Tensor,
    teacher: Tensor | SparseTeacher,
    labels: Tensor | None,
    valid: Tensor,
    coefs: tuple[Tensor, Tensor],
    plan: _Plan,
    target_logprob: Tensor | None = None,
) -> ChunkResult:
    """Any KD (sparse modes, vocab maps): the logit gradient by autograd on the chunk's graph."""
    need_grad = any(plan.needs_grad)
    logits.requires_grad_(need_grad)
    with torch.enable_grad():
        kd = kd_per_position(
            logits,
            teacher,
            plan.spec,
            vocab_map=plan.vocab_map,
            generator=plan.generator,
            targets=labels,
            target_logprob=target_logprob,
            teacher_to_student=plan.teacher_to_student,
        )
        loss = (coefs[0] * torch.where(valid, kd, 0.0)).sum()
        ce = None
        if labels is not None:
            ce = cross_entropy_per_position(
                logits, labels, ignore_index=plan.ignore_index, label_smoothing=plan.label_smoothing
            )
            loss = loss + (coefs[1] * ce).sum()
    grad = torch.autograd.grad(loss, logits)[0] if need_grad else None
    return kd.detach(), None if ce is None else ce.detach(), grad


def _process_chunk(
    rows: slice,
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    workspace: _Workspace | None,
    plan: _Plan,
) -> tuple[Tensor, Tensor]:
    """One chunk: add its gradients into ``grads`` in place; return its weighted KD and CE sums.

    A function of its own so that the chunk's ``[c, V]`` tensors are freed on return, before
    the next chunk allocates its own.
    """
    s_hidden, s_weight, s_bias = student
    dtype = compute_dtype(s_hidden.dtype)
    valid = plan.valid[rows]
    weights = valid.to(dtype)
    if plan.weights is not None:
        weights = torch.where(valid, plan.weights[rows].to(dtype), 0.0)
    kd_weights = weights if plan.kd_valid is None else torch.where(plan.kd_valid[rows], weights, 0.0)
    # Where the KD term is masked out (no teacher signal at that position), CE takes the whole weight.
    ce_weights = weights * (1.0 - plan.alpha) if plan.kd_valid is None else weights - plan.alpha * kd_weights
    coefs = (
        kd_weights * (plan.alpha * plan.kd_scale / plan.denominator),
        ce_weights / plan.denominator
        if plan.kd_valid is not None
        else weights * ((1.0 - plan.alpha) / plan.denominator),
    )
    hidden = s_hidden[rows]
    logits = _linear(hidden, s_weight, s_bias, None if workspace is None else workspace.student)
    labels = None if plan.labels is None else plan.labels[rows]
    if workspace is not None:
        t_hidden, t_weight, t_bias = teacher
        teacher_logits = _linear(t_hidden[rows], t_weight, t_bias, workspace.teacher).to(logits.dtype)
        kd, ce = blended_rows_and_grad_(
            logits,
            teacher_logits,
            labels,
            coefs,
            plan.spec,
            ignore_index=plan.ignore_index,
            label_smoothing=plan.label_smoothing,
            scratch=workspace.scratch,
        )
        grad_logits = logits
    else:
        t_hidden, t_weight, t_bias = teacher
        chunk_teacher = (
            plan.sparse_teacher.rows(rows)
            if plan.sparse_teacher is not None
            else F.linear(t_hidden[rows], t_weight, t_bias)
        )
        chunk_target = None if plan.target_logprob is None else plan.target_logprob[rows]
        kd, ce, grad_logits = _chunk_autograd(logits, chunk_teacher, labels, valid, coefs, plan, chunk_target)
    grad_hidden, grad_weight, grad_bias = grads
    if grad_logits is not None:
        grad_logits = grad_logits.to(s_hidden.dtype)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits @ s_weight
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, hidden)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    kd_sum = (kd_weights * torch.where(valid, kd, 0.0)).sum()
    ce_sum = weights.new_zeros(()) if ce is None else (weights * ce).sum()
    blended_ce_sum = weights.new_zeros(()) if ce is None else (ce_weights * ce).sum()
    return kd_sum, ce_sum, blended_ce_sum


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, plan: _Plan):
        grads = tuple(
            torch.zeros_like(t) if needed else None
            for t, needed in zip((s_hidden, s_weight, s_bias), plan.needs_grad, strict=True)
        )
        n_tokens = s_hidden.shape[0]
        workspace = _Workspace.create(plan, n_tokens, s_weight, t_weight) if plan.closed_form else None
        kd_total = ce_total = blended_total = torch.zeros(
            (), dtype=compute_dtype(s_hidden.dtype), device=s_hidden.device
        )
        for start in range(0, n_tokens, plan.chunk_size):
            rows = slice(start, start + plan.chunk_size)
            if plan.valid[rows].any():
                kd_sum, ce_sum, blended_sum = _process_chunk(
                    rows, (s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias), grads, workspace, plan
                )
                kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
                blended_total = blended_total + blended_sum
        ctx.save_for_backward(*grads)
        kd = kd_total * (plan.kd_scale / plan.denominator)
        ce = ce_total / plan.denominator
        if plan.kd_valid is None:
            loss = plan.alpha * kd + (1.0 - plan.alpha) * ce
        else:  # CE at full weight where KD is masked out
            loss = plan.alpha * kd + blended_total / plan.denominator
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grads = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return (*grads, None, None, None, None)


def _flatten(x: Tensor | None, trailing: int) -> Tensor | None:
    """``[B, L, *trailing]`` or ``[N, *trailing]`` → ``[N, *trailing]``."""
    if x is None:
        return None
    return x.reshape(-1, *x.shape[x.dim() - trailing :]) if trailing else x.reshape(-1)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    beta: float = 0.5,
    skew: float = 0.1,
    labels: Tensor | None = None,
    alpha: float = 1.0,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    scale_by_t2: bool = True,
    vocab_map: Tensor | None = None,
    reduction: str = "mean",
    student_head_bias: Tensor | None = None,
    teacher_head_bias: Tensor | None = None,
    sparse: str | None = None,
    top_k: int = 64,
    num_samples: int = 64,
    sparse_teacher: SparseTeacher | None = None,
    generator: torch.Generator | None = None,
    kd_mask: Tensor | None = None,
    target_logprob: Tensor | None = None,
    uld_weight: float = 0.0,
    teacher_to_student: Tensor | None = None,
) -> DistillOutput:
    """Distillation loss from hidden states and output heads, computed chunk by chunk.

    Equal (up to float rounding) to :func:`sakd.losses.distill_loss` on
    ``student_hidden @ student_head_weight.T`` and ``teacher_hidden @ teacher_head_weight.T``,
    with peak extra memory ``O(chunk_size × V)`` instead of ``O(N × V)``.

    Args:
        student_hidden: ``[N, Hs]`` or ``[B, L, Hs]`` final student hidden states.
        student_head_weight: ``[Vs, Hs]`` output head (the embedding matrix when tied: its
            gradient then simply adds to the embedding gradient).
        teacher_hidden: ``[N, Ht]`` / ``[B, L, Ht]``; never receives gradients. None when
            ``sparse_teacher`` is given.
        teacher_head_weight: ``[Vt, Ht]``; ``Vt == Vs`` unless ``vocab_map`` is given.
        kind: ``fkl | rkl | jsd | skl | srkl | tvd``.
        temperature: T dividing both sides' logits for the KD term (not for CE).
        chunk_size: tokens per chunk. For the dense kinds the extra memory is two
            ``[chunk_size, V]`` logit buffers, two ``[block, V]`` scratch buffers of 8 MiB and
            the ``[Vs, Hs]`` head-weight gradient; sparse modes and vocab maps keep a few more
            ``[chunk_size, V]`` tensors alive (autograd on the chunk).
        mask: ``[N]`` / ``[B, L]`` bool, True = valid.
        weights: ``[N]`` / ``[B, L]`` float per-token multipliers applied to both terms.
        labels: ``[N]`` / ``[B, L]`` next-token targets aligned with the hidden states; when
            given, the result is ``alpha·[T²·]D + (1−alpha)·CE`` and positions with
            ``ignore_index`` are excluded from both terms.
        alpha: KD weight in [0, 1]; must be 1 without labels.
        scale_by_t2: multiply the KD term by T².
        vocab_map: ``[Vs]`` int, teacher id per student id or -1 (see
            :mod:`sakd.losses.vocab_map`).
        reduction: ``"mean"`` (over valid tokens) or ``"sum"`` (for a trainer that divides by a
            global token count). ``"none"`` is not available: the head-weight gradient is
            accumulated over tokens during the forward pass.
        sparse: None (dense) or ``subset | topk_tail | sampled``, built per chunk from the
            teacher logits, or taken from ``sparse_teacher``.
        top_k, num_samples, generator: parameters of the on-the-fly sparse modes (with a
            vocab map, applied to the projected distributions).
        kd_mask: ``[N]`` / ``[B, L]`` bool; the KD term only counts where True. Where False there is no
            teacher signal, so CE takes the whole weight there (1 instead of 1 - alpha). Cross-tokenizer
            KD uses it for the positions that have a teacher anchor. The normalizer stays the number
            of valid positions.
        target_logprob: ``[N]`` / ``[B, L]`` teacher log-probability (at temperature T) of the
            text of each position's label, by the chain rule, or NaN (needs ``vocab_map`` and
            ``labels``; see :func:`sakd.losses.vocab_map.project_with_targets`).
        uld_weight: with ``vocab_map``, weight of the ULD term on the unmapped ids.
        teacher_to_student: ``[Vt]`` many-to-one map used instead of ``vocab_map`` for the
            projection (:func:`sakd.losses.vocab_map.project_many_to_one`).
        sparse_teacher: a stored :class:`SparseTeacher` with ``[N, K]`` / ``[B, L, K]`` fields
            (offline cache); replaces ``teacher_hidden`` / ``teacher_head_weight``.

    Returns:
        :class:`DistillOutput` with the differentiable ``loss`` (gradients reach
        ``student_hidden``, ``student_head_weight`` and ``student_head_bias``), detached ``kd``
        and ``ce`` (None without labels) in the same reduction, and ``num_tokens``.
    """
    spec = KDSpec(kind, temperature, beta, skew, sparse, top_k, num_samples, uld_weight)
    if (target_logprob is not None or uld_weight > 0) and vocab_map is None and teacher_to_student is None:
        raise ValueError("target_logprob and uld_weight need a vocab_map")
    if target_logprob is not None and labels is None:
        raise ValueError("target_logprob needs labels (the targets whose text it scores)")
    check_blend(alpha, labels)
    check_reduction(reduction)
    if reduction == "none":
        raise ValueError("fused_linear_divergence supports reduction='mean' or 'sum', not 'none'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if sparse_teacher is not None and sparse is None:
        raise ValueError("sparse_teacher needs a sparse mode (sparse='subset'|'topk_tail'|'sampled')")
    hidden = _flatten(student_hidden, 1)
    n_tokens = hidden.shape[0]
    t_hidden = _flatten(teacher_hidden, 1)
    stored = None if sparse_teacher is None else sparse_teacher.reshape(-1)
    n_teacher = stored.indices.shape[0] if stored is not None else t_hidden.shape[0]
    if n_teacher != n_tokens:
        raise ValueError(f"student has {n_tokens} positions but the teacher signal has {n_teacher}")
    if stored is None:
        vs, vt = student_head_weight.shape[0], teacher_head_weight.shape[0]
        if vocab_map is not None:
            check_vocab_map(vocab_map, vs, vt)
        elif teacher_to_student is not None:
            if teacher_to_student.shape != (vt,) or int(teacher_to_student.max()) >= vs:
                raise ValueError(f"teacher_to_student must be [{vt}] student ids in [0, {vs}) or -1")
        elif vs != vt:
            raise ValueError(
                f"student vocab {vs} != teacher vocab {vt}; pass a vocab_map to distill across tokenizers"
            )
    labels = _flatten(labels, 0)
    valid = valid_positions(torch.Size([n_tokens]), hidden.device, _flatten(mask, 0), labels, ignore_index)
    num_tokens = valid.sum()
    grad_on = torch.is_grad_enabled()
    plan = _Plan(
        spec=spec,
        valid=valid,
        weights=_flatten(weights, 0),
        labels=labels,
        sparse_teacher=stored,
        alpha=alpha,
        kd_scale=temperature**2 if scale_by_t2 else 1.0,
        denominator=float(num_tokens.clamp_min(1)) if reduction == "mean" else 1.0,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        vocab_map=vocab_map,
        teacher_to_student=teacher_to_student,
        kd_valid=None if kd_mask is None else _flatten(kd_mask, 0).bool(),
        target_logprob=None if target_logprob is None else _flatten(target_logprob, 0),
        generator=generator,
        needs_grad=tuple(
            grad_on and t is not None and t.requires_grad
            for t in (hidden, student_head_weight, student_head_bias)
        ),
    )
    with torch.no_grad():
        t_weight = None if teacher_head_weight is None else teacher_head_weight.detach()
        t_bias = None if teacher_head_bias is None else teacher_head_bias.detach()
        t_hidden = None if t_hidden is None else t_hidden.detach()
    loss, kd, ce = _FusedLinearKD.apply(
        hidden, student_head_weight, student_head_bias, t_hidden, t_weight, t_bias, plan
    )
    return DistillOutput(loss=loss, kd=kd, ce=None if labels is None else ce, num_tokens=num_tokens)
