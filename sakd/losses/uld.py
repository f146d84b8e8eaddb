"""Universal Logit Distillation (ULD) between distributions over different vocabularies.

Boizard et al., 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs". When the teacher and the student do not share a tokenizer there is no
correspondence between vocabulary ids, so ULD compares the two distributions up to a
permutation: each side's probabilities are sorted in decreasing order, the shorter vector is
zero-padded to the longer length, and the loss is the sum of absolute differences,

    ULD(p, q) = Σ_i |p_(i) − q_(i)|,   p_(1) ≥ p_(2) ≥ …,   q_(1) ≥ q_(2) ≥ …

(the closed form of the Wasserstein-1 distance with unit cost between sorted probability
vectors used in the paper). It is a true metric on sorted vectors: symmetric, 0 iff both sides
are permutations of each other (up to zero padding), and at most 2 for two distributions.

Typical use with a partial vocab map: a divergence on the mapped ids plus ULD on "the unmapped
remainder", selected with ``student_mask`` / ``teacher_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reduction import compute_dtype


def _select_ids(probs: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """Keep the vocabulary ids where ``mask`` is True (``probs`` ``[..., V]``, ``mask`` ``[V]``)."""
    if mask is None:
        return probs
    if mask.dtype != torch.bool or mask.shape != probs.shape[-1:]:
        raise ValueError(
            f"{name} must be a bool tensor of shape ({probs.shape[-1]},), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return probs.index_select(-1, mask.nonzero().squeeze(-1).to(probs.device))


def uld_distance(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
) -> Tensor:
    """Per-position ULD distance Σ_i |sort(q)_i − sort(p)_i| between two vocabularies.

    Probabilities are computed in float32 (float64 stays float64) as ``exp(logprobs)``, so
    ``-inf`` entries are exact zeros. Gradients flow to whichever input requires them (through
    the sort, i.e. to the ids that land at each rank); pass a detached teacher.

    Masks restrict a side to a subset of its ids: probabilities outside the mask are simply
    dropped and the kept ones are **not** renormalized, so a side whose mask keeps mass m
    contributes a sub-distribution of total mass m (that is what the "unmapped remainder" of a
    partial vocab map should be compared as: the mass the mapped part did not already cover).
    An all-False mask leaves an empty side, which is treated as all zeros.

    Memory is O(N·max(Vs, Vt)) (one sort per side); no ``[N, V, V]`` tensor is built.

    Args:
        student_logprobs: ``[N, Vs]`` normalized student log-probs (any leading dims work).
        teacher_logprobs: ``[N, Vt]`` normalized teacher log-probs (same leading dims).
        student_mask: ``[Vs]`` bool, True = keep this student id; None keeps all.
        teacher_mask: ``[Vt]`` bool, True = keep this teacher id; None keeps all.

    Returns:
        ``[N]`` distance per position (no reduction), in the compute dtype.
    """
    if student_logprobs.shape[:-1] != teacher_logprobs.shape[:-1]:
        raise ValueError(
            f"student {tuple(student_logprobs.shape)} and teacher {tuple(teacher_logprobs.shape)} "
            "log-probs must agree on every dimension but the last"
        )
    dtype = compute_dtype(torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype))
    student = _select_ids(student_logprobs.to(dtype).exp(), student_mask, "student_mask")
    teacher = _select_ids(teacher_logprobs.to(dtype).exp(), teacher_mask, "teacher_mask")
    student = student.sort(dim=-1, descending=True).values
    teacher = teacher.sort(dim=-1, descending=True).values
    width = max(student.shape[-1], teacher.shape[-1])
    student = F.pad(student, (0, width - student.shape[-1]))
    teacher = F.pad(teacher, (0, width - teacher.shape[-1]))
    return (student - teacher).abs().sum(-1)
