"""The chunk loop of the fused loss (:func:`sakd.losses.fused_distill`): a custom autograd function whose
forward walks over chunks of tokens, computes each chunk's logits, loss and -- right away -- the gradients
with respect to the chunk's hidden states and (accumulated) the head, so that only ``O(chunk × V)`` extra
memory is ever live; its backward only scales the stored gradients.

Two ways to get a chunk's logit gradient:

- closed form (:mod:`sakd.losses.logit_grads` for the dense kinds on one vocabulary,
  :mod:`sakd.losses.sparse_grads` and :mod:`sakd.losses.bucket_grads` for the sparse modes and the
  vocabulary bridges), computed in place in buffers allocated once per call, a block of rows at a time;
- autograd on the chunk's small graph built from :func:`~sakd.losses.blend.kd_per_position` and
  :func:`~sakd.losses.cross_entropy.cross_entropy_per_position` (so it behaves exactly like the unfused
  :func:`sakd.losses.distill_loss`) for what has no closed form: no-grad evaluation, a ULD term
  (``uld_weight > 0``), and with a vocabulary bridge a stored :class:`SparseTeacher` or the ``sampled``
  mode (see :attr:`ChunkPlan.closed_form`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .blend import kd_per_position
from .bucket_grads import BridgeIndex
from .cross_entropy import cross_entropy_per_position
from .logit_grads import blended_rows_and_grad_, block_rows
from .mixture import mixture_logits
from .reduction import compute_dtype
from .sparse import SparseTeacher, sample_teacher
from .sparse_grads import kd_block_for
from .spec import KDSpec, VocabBridge
from .stored_grads import kept_dtype, upstream_scaled, zero_grads


@dataclass(frozen=True)
class ChunkPlan:
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
    kd_weights: Tensor | None = None  # per-position multipliers of the KD term only
    ce_weight_without_kd: float = 1.0  # CE's share of the weight where kd_valid is False (loss only)

    @property
    def crosses(self) -> bool:
        return self.vocab_map is not None or self.teacher_to_student is not None

    @property
    def closed_form(self) -> bool:
        """Whether the chunks' gradients come in closed form; the rest goes through autograd per chunk."""
        if not any(self.needs_grad) or self.spec.uld_weight > 0:
            return False
        return not (self.crosses and (self.sparse_teacher is not None or self.spec.sparse == "sampled"))


@dataclass(frozen=True)
class _Workspace:
    """Buffers of the closed-form path, reused by every chunk: student and teacher logits ``[chunk, V]``
    (no teacher buffer for a stored sparse teacher), a ``[block, max(Vs, Vt)]`` scratch buffer and a
    ``[block, Vs]`` one for the CE gradient; and the vocabulary bridge's index tensors."""

    student: Tensor
    teacher: Tensor | None
    scratch: tuple[Tensor, Tensor | None]
    block: int
    bridge: BridgeIndex | None

    @staticmethod
    def create(plan: ChunkPlan, n_tokens: int, s_weight: Tensor, t_weight: Tensor | None) -> _Workspace:
        dtype, device = compute_dtype(s_weight.dtype), s_weight.device
        rows, vocab = min(plan.chunk_size, n_tokens), s_weight.shape[0]
        t_vocab = vocab if t_weight is None else t_weight.shape[0]
        widest = max(vocab, t_vocab)
        block = block_rows(rows, widest)
        bridge = None
        if plan.crosses:
            bridge = BridgeIndex.cached(VocabBridge(plan.vocab_map, plan.teacher_to_student), vocab, t_vocab)
        return _Workspace(
            student=torch.empty(rows, vocab, dtype=dtype, device=device),
            teacher=None if t_weight is None else torch.empty(rows, t_vocab, dtype=dtype, device=device),
            scratch=(
                torch.empty(block, widest, dtype=dtype, device=device),
                None if plan.labels is None else torch.empty(block, vocab, dtype=dtype, device=device),
            ),
            block=block,
            bridge=bridge,
        )


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` in the compute dtype, written into ``out[:len(x)]`` when given
    and the dtypes agree (otherwise a new tensor)."""
    if out is None or x.dtype != out.dtype or weight.dtype != out.dtype:
        return F.linear(x, weight, bias).to(compute_dtype(x.dtype))
    out = out[: x.shape[0]]
    return torch.mm(x, weight.T, out=out) if bias is None else torch.addmm(bias, x, weight.T, out=out)


def _teacher_logits(
    t_hidden: Tensor, t_weight: Tensor, t_bias: Tensor | None, out: Tensor | None, spec: KDSpec
) -> Tensor:
    """A chunk's teacher logits; ``[c, M, H]`` hidden states (M samples) give their mixture's logits."""
    if t_hidden.dim() == 2:
        return (
            F.linear(t_hidden, t_weight, t_bias) if out is None else _linear(t_hidden, t_weight, t_bias, out)
        )
    return mixture_logits(
        F.linear(t_hidden, t_weight, t_bias).to(compute_dtype(t_hidden.dtype)), spec.temperature
    )


ChunkResult = tuple[Tensor, Tensor | None, Tensor | None]
"""Per-position KD ``[c]``, CE ``[c]`` (or None), ∂(chunk loss)/∂logits ``[c, V]`` (or None)."""


def _chunk_autograd(
    logits: Tensor,
    teacher: Tensor | SparseTeacher,
    labels: Tensor | None,
    valid: Tensor,
    coefs: tuple[Tensor, Tensor],
    plan: ChunkPlan,
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


def _closed_form_kd(
    rows: slice,
    teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
    workspace: _Workspace,
    plan: ChunkPlan,
):
    """The chunk's KD term in closed form (:func:`sakd.losses.sparse_grads.kd_block_for`)."""
    spec = plan.spec
    if plan.sparse_teacher is not None:
        chunk_teacher: Tensor | SparseTeacher = plan.sparse_teacher.rows(rows)
    else:
        t_hidden, t_weight, t_bias = teacher
        chunk_teacher = _teacher_logits(t_hidden[rows], t_weight, t_bias, workspace.teacher, spec)
        chunk_teacher = chunk_teacher.to(workspace.student.dtype)
        if spec.sparse == "sampled":  # one draw per chunk, as the autograd path (and its tests) make
            chunk_teacher = sample_teacher(
                chunk_teacher, spec.num_samples, temperature=spec.temperature, generator=plan.generator
            )
    return kd_block_for(
        spec,
        chunk_teacher,
        bridge=workspace.bridge,
        targets=None if plan.labels is None else plan.labels[rows],
        chain=None if plan.target_logprob is None else plan.target_logprob[rows],
        scratch=workspace.scratch[0],
    )


def _process_chunk(
    rows: slice,
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor | None, Tensor | None, Tensor | None],
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    workspace: _Workspace | None,
    plan: ChunkPlan,
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
    if plan.kd_valid is not None and plan.ce_weight_without_kd != 1.0:  # the loss only: ce_sum stays plain CE
        ce_weights = torch.where(plan.kd_valid[rows], ce_weights, ce_weights * plan.ce_weight_without_kd)
    if plan.kd_weights is not None:  # after the CE weights: they stay what they were
        kd_weights = kd_weights * plan.kd_weights[rows].to(dtype)
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
        kd, ce = blended_rows_and_grad_(
            logits,
            labels,
            coefs,
            _closed_form_kd(rows, teacher, workspace, plan),
            block=workspace.block,
            ignore_index=plan.ignore_index,
            label_smoothing=plan.label_smoothing,
            ce_scratch=workspace.scratch[1],
        )
        grad_logits = logits
    else:
        t_hidden, t_weight, t_bias = teacher
        chunk_teacher = (
            plan.sparse_teacher.rows(rows)
            if plan.sparse_teacher is not None
            else _teacher_logits(t_hidden[rows], t_weight, t_bias, None, plan.spec)
        )
        chunk_target = None if plan.target_logprob is None else plan.target_logprob[rows]
        kd, ce, grad_logits = _chunk_autograd(logits, chunk_teacher, labels, valid, coefs, plan, chunk_target)
    grad_hidden, grad_weight, grad_bias = grads
    if grad_logits is not None:
        keep = kept_dtype(
            s_hidden.dtype
        )  # fp16: float32 until backward has scaled it (sakd.losses.stored_grads)
        grad_logits = grad_logits.to(keep)
        if grad_hidden is not None:
            grad_hidden[rows] = grad_logits.to(s_weight.dtype) @ s_weight  # per position: cannot overflow
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T, hidden.to(keep))
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
    kd_sum = (kd_weights * torch.where(valid, kd, 0.0)).sum()
    ce_sum = weights.new_zeros(()) if ce is None else (weights * ce).sum()
    blended_ce_sum = weights.new_zeros(()) if ce is None else (ce_weights * ce).sum()
    return kd_sum, ce_sum, blended_ce_sum


class FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, plan: ChunkPlan):
        grads = tuple(zero_grads((s_hidden, s_weight, s_bias), plan.needs_grad))
        n_tokens = s_hidden.shape[0]
        workspace = _Workspace.create(plan, n_tokens, s_weight, t_weight) if plan.closed_form else None
        kd_total = ce_total = blended_total = torch.zeros(
            (), dtype=compute_dtype(s_hidden.dtype), device=s_hidden.device
        )
        starts = range(0, n_tokens, plan.chunk_size)
        # chunks without a valid position are skipped; decided for all chunks with one host sync
        nonempty = (
            torch.stack([plan.valid[start : start + plan.chunk_size].any() for start in starts]).tolist()
            if n_tokens
            else []
        )
        for start, has_valid in zip(starts, nonempty, strict=True):
            rows = slice(start, start + plan.chunk_size)
            if has_valid:
                kd_sum, ce_sum, blended_sum = _process_chunk(
                    rows, (s_hidden, s_weight, s_bias), (t_hidden, t_weight, t_bias), grads, workspace, plan
                )
                kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
                blended_total = blended_total + blended_sum
        ctx.save_for_backward(*grads)
        ctx.dtypes = tuple(
            None if g is None else t.dtype for g, t in zip(grads, (s_hidden, s_weight, s_bias), strict=True)
        )
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
        return (*upstream_scaled(ctx.saved_tensors, grad_loss, ctx.dtypes), None, None, None, None)
