"""Fused, chunked linear-head + distillation loss: never materializes ``[N, V]`` logits.

The approach of Liger-Kernel's fused linear losses (Hsu et al., 2024, "Liger Kernel: Efficient
Triton Kernels for LLM Training"): the forward pass walks over chunks of ``chunk_size`` tokens,
computes that chunk's student and teacher logits, its loss, and -- right away -- the gradients
with respect to the chunk's student hidden states and (accumulated) the student head weight and
bias. Only ``O(chunk_size × V)`` extra memory is live at any time. The chunk loop itself is
:mod:`sakd.losses.chunk_loop`; this module holds the two public entry points:
:func:`fused_distill` (the tensors plus a typed description of the loss) and
:func:`fused_linear_divergence` (the same, every option a keyword).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blend import DistillOutput, check_blend, valid_positions
from .bucket_grads import per_tensor
from .chunk_loop import ChunkPlan, FusedLinearKD
from .chunk_size import resolve_chunk_size
from .chunked import Head
from .draws import BlockDraws, draw_blocks
from .mixture import mixture_logits
from .sparse import SparseTeacher
from .spec import KDSpec, ObjectiveSpec, Targets, VocabBridge
from .vocab_map import check_vocab_map

_NO_TARGETS = Targets()
_SAME_VOCAB = VocabBridge()


def _flatten(x: Tensor | None, trailing: int) -> Tensor | None:
    """``[B, L, *trailing]`` or ``[N, *trailing]`` → ``[N, *trailing]``."""
    if x is None:
        return None
    return x.reshape(-1, *x.shape[x.dim() - trailing :]) if trailing else x.reshape(-1)


@dataclass(frozen=True)
class HeadInput:
    """Hidden states and the output head that turns them into logits.

    ``hidden``: ``[N, H]`` or ``[B, L, H]``; ``head``: weight ``[V, H]`` (the embedding matrix when tied:
    its gradient then simply adds to the embedding gradient), optional bias; ``head.vocab`` keeps only the
    first rows (a head padded past its tokenizer). A teacher with ``mixture`` has ``hidden`` ``[N, M, H]``
    (or ``[B, L, M, H]``): M samples per position, and the KD term is taken against the equal mixture of
    their distributions at the KD temperature (:func:`sakd.losses.mixture.mixture_logits`)."""

    hidden: Tensor
    head: Head
    mixture: bool = False  # teacher only: hidden is [N, M, H], M samples whose distributions are mixed


def _check_teacher(
    teacher: HeadInput | SparseTeacher, student_vocab: int, spec: ObjectiveSpec, bridge: VocabBridge
) -> None:
    if isinstance(teacher, SparseTeacher):
        if spec.kd.sparse is None:
            raise ValueError("a SparseTeacher needs a sparse mode (sparse='subset'|'topk_tail'|'sampled')")
        return
    vs, vt = student_vocab, _rows(teacher.head)
    if bridge.vocab_map is not None:  # checked once per map tensor (a run passes the same one every time)
        per_tensor(bridge.vocab_map, ("checked", vs, vt), lambda: check_vocab_map(bridge.vocab_map, vs, vt))
    elif bridge.teacher_to_student is not None:
        t2s = bridge.teacher_to_student
        if t2s.shape != (vt,) or per_tensor(t2s, "max", lambda: int(t2s.max())) >= vs:
            raise ValueError(f"teacher_to_student must be [{vt}] student ids in [0, {vs}) or -1")
    elif vs != vt:
        raise ValueError(
            f"student vocab {vs} != teacher vocab {vt}; pass a vocab_map to distill across tokenizers"
        )


def _teacher_rows(teacher: HeadInput) -> Tensor:
    """The teacher's hidden states as ``[N, H]``, or ``[N, M, H]`` for a mixture of M samples."""
    if teacher.mixture:
        return teacher.hidden.reshape(-1, *teacher.hidden.shape[-2:])
    return _flatten(teacher.hidden, 1)


def _drawn_teacher(teacher: HeadInput, spec: KDSpec, draws: BlockDraws) -> SparseTeacher:
    """The on-the-fly ``sampled`` draws of every row (:func:`sakd.losses.draws.draw_blocks`), the teacher's
    log-probs computed as a cache computes them (at least float32, a mixture's at the KD temperature)."""
    rows = _teacher_rows(teacher).detach()

    def logprobs_of(r: slice) -> Tensor:
        logits = teacher.head.logits(rows[r], upcast=True)
        if teacher.mixture:
            logits = mixture_logits(logits, spec.temperature)
        return torch.log_softmax(logits / spec.temperature, dim=-1)

    return draw_blocks(logprobs_of, rows.shape[0], draws, spec.num_samples, spec.temperature, rows.device)


def _rows(head: Head) -> int:
    return head.weight.shape[0] if head.vocab is None else head.vocab


def _sliced(head: Head) -> tuple[Tensor, Tensor | None]:
    if head.vocab is None:
        return head.weight, head.bias
    return head.weight[: head.vocab], None if head.bias is None else head.bias[: head.vocab]


def fused_distill(
    student: HeadInput,
    teacher: HeadInput | SparseTeacher,
    spec: ObjectiveSpec,
    targets: Targets = _NO_TARGETS,
    bridge: VocabBridge = _SAME_VOCAB,
    generator: torch.Generator | None = None,
    draws: BlockDraws | None = None,
) -> DistillOutput:
    """The blended distillation loss from hidden states and output heads, computed chunk by chunk.

    Equal (up to float rounding) to :func:`sakd.losses.distill_loss` on the logits
    ``student.hidden @ student.head.weight.T`` and the teacher's, with peak extra memory
    ``O(spec.chunk_size × V)`` instead of ``O(N × V)``.

    Args:
        student: the student's hidden states and head; gradients reach ``hidden``, the head weight and
            bias (whichever require grad).
        teacher: the teacher's hidden states and head (never receive gradients), or a stored
            :class:`SparseTeacher` (an offline cache; needs ``spec.kd.sparse``) with ``[N, K]`` fields.
        spec: what to compute (:class:`ObjectiveSpec`); ``reduction`` ``"none"`` is not available: the
            head-weight gradient is accumulated over tokens during the forward pass.
        targets: labels, masks, weights, KD mask and chain-rule scores (:class:`Targets`).
        bridge: the vocabulary map(s) when the teacher has another vocabulary (:class:`VocabBridge`).
        generator: random generator of the on-the-fly ``sampled`` mode (one draw per chunk, in order:
            the draws then depend on the chunk size); ignored with ``draws``.
        draws: the on-the-fly ``sampled`` mode draws each position from its block's stream instead
            (:mod:`sakd.losses.draws`: the same however the step is split, as an offline cache), all before
            the chunk loop, which then reads them like a stored signal (across tokenizers: the stored
            signal's projection, :mod:`sakd.losses.sparse_projection`).

    Returns:
        :class:`DistillOutput` with the differentiable ``loss``, detached ``kd`` and ``ce`` (None without
        labels) in the same reduction, and ``num_tokens``.

    Memory: the extra memory is the student's and the teacher's ``[chunk, V]`` logit buffers, a few
    ``[block, V]`` scratch blocks of at most :data:`~sakd.losses.logit_grads.BLOCK_ELEMENTS` floats and the
    gradients (``[Vs, Hs]`` head weight, ``[N, Hs]`` hidden states). What has no closed form (see
    :attr:`~sakd.losses.chunk_loop.ChunkPlan.closed_form`) keeps a few more ``[chunk, V]`` tensors alive
    (autograd on the chunk).
    """
    kd_spec = spec.kd
    if (targets.target_logprob is not None or kd_spec.uld_weight > 0) and not bridge.crosses:
        raise ValueError("target_logprob and uld_weight need a vocab_map")
    if targets.target_logprob is not None and targets.labels is None:
        raise ValueError("target_logprob needs labels (the targets whose text it scores)")
    check_blend(spec.alpha, targets.labels)
    if spec.reduction == "none":
        raise ValueError("fused_linear_divergence supports reduction='mean' or 'sum', not 'none'")
    s_weight, s_bias = _sliced(student.head)
    _check_teacher(teacher, s_weight.shape[0], spec, bridge)
    hidden = _flatten(student.hidden, 1)
    n_tokens = hidden.shape[0]
    stored = teacher.reshape(-1) if isinstance(teacher, SparseTeacher) else None
    if stored is None and kd_spec.sparse == "sampled" and draws is not None:
        stored = _drawn_teacher(teacher, kd_spec, draws)
    n_teacher = stored.indices.shape[0] if stored is not None else _teacher_rows(teacher).shape[0]
    if n_teacher != n_tokens:
        raise ValueError(f"student has {n_tokens} positions but the teacher signal has {n_teacher}")
    labels = _flatten(targets.labels, 0)
    valid = valid_positions(
        torch.Size([n_tokens]), hidden.device, _flatten(targets.mask, 0), labels, spec.ignore_index
    )
    num_tokens = valid.sum()
    grad_on = torch.is_grad_enabled()
    t_size = (0, 0) if stored is not None else (_rows(teacher.head), teacher.head.weight.shape[1])
    chunk_size = resolve_chunk_size(
        spec.chunk_size, n_tokens, (s_weight.shape[0], t_size[0]), (hidden.shape[-1], t_size[1])
    )
    plan = ChunkPlan(
        spec=kd_spec,
        valid=valid,
        weights=_flatten(targets.weights, 0),
        labels=labels,
        sparse_teacher=stored,
        alpha=spec.alpha,
        kd_scale=spec.kd_scale,
        denominator=float(num_tokens.clamp_min(1)) if spec.reduction == "mean" else 1.0,
        label_smoothing=spec.label_smoothing,
        ignore_index=spec.ignore_index,
        chunk_size=chunk_size,
        vocab_map=bridge.vocab_map,
        teacher_to_student=bridge.teacher_to_student,
        kd_valid=None if targets.kd_mask is None else _flatten(targets.kd_mask, 0).bool(),
        target_logprob=_flatten(targets.target_logprob, 0),
        kd_weights=_flatten(targets.kd_weights, 0),
        ce_weight_without_kd=targets.ce_weight_without_kd,
        generator=generator,
        needs_grad=tuple(grad_on and t is not None and t.requires_grad for t in (hidden, s_weight, s_bias)),
    )
    t_hidden = t_weight = t_bias = None
    if stored is None:
        with torch.no_grad():
            t_weight, t_bias = (None if x is None else x.detach() for x in _sliced(teacher.head))
            t_hidden = _teacher_rows(teacher).detach()
    loss, kd, ce = FusedLinearKD.apply(hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, plan)
    return DistillOutput(loss=loss, kd=kd, ce=None if labels is None else ce, num_tokens=num_tokens)


def fused_linear_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head_weight: Tensor | None,
    kind: str = "fkl",
    *,
    temperature: float = 1.0,
    chunk_size: int | str = "auto",
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
    """:func:`fused_distill` with every option as a keyword (the stable public call form).

    ``student_hidden`` ``[N, Hs]`` / ``[B, L, Hs]`` with ``student_head_weight`` ``[Vs, Hs]`` (and
    ``student_head_bias``); ``teacher_hidden`` / ``teacher_head_weight`` likewise (None when
    ``sparse_teacher`` is given); ``kind``, ``temperature``, ``beta``, ``skew``, ``sparse``, ``top_k``,
    ``num_samples``, ``uld_weight`` form the :class:`KDSpec`; ``alpha``, ``label_smoothing``,
    ``scale_by_t2``, ``chunk_size``, ``ignore_index``, ``reduction`` the :class:`ObjectiveSpec`; ``labels``,
    ``mask``, ``weights``, ``kd_mask``, ``target_logprob`` the :class:`Targets`; ``vocab_map`` /
    ``teacher_to_student`` the :class:`VocabBridge`. See those classes for each one's meaning.
    """
    spec = ObjectiveSpec(
        kd=KDSpec(kind, temperature, beta, skew, sparse, top_k, num_samples, uld_weight),
        alpha=alpha,
        label_smoothing=label_smoothing,
        scale_by_t2=scale_by_t2,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if sparse_teacher is not None:
        teacher: HeadInput | SparseTeacher = sparse_teacher
    else:
        teacher = HeadInput(teacher_hidden, Head(teacher_head_weight, teacher_head_bias))
    return fused_distill(
        HeadInput(student_hidden, Head(student_head_weight, student_head_bias)),
        teacher,
        spec,
        Targets(labels=labels, mask=mask, weights=weights, kd_mask=kd_mask, target_logprob=target_logprob),
        VocabBridge(vocab_map=vocab_map, teacher_to_student=teacher_to_student),
        generator,
    )
