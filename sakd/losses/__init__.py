"""Distillation losses: pure functions of tensors, computed in float32.

- :func:`divergence` — fkl / rkl / jsd / skl / srkl / tvd between full logits.
- :func:`cross_entropy`, :func:`distill_loss` — CE and the blended objective.
- :func:`sparse_divergence`, :class:`SparseTeacher` — subset / top-k+tail / sampled KD.
- :func:`fused_linear_divergence` — the same objective from hidden states and heads, chunked.
"""

from .blend import DistillOutput, KDSpec, distill_loss, kd_per_position
from .cross_entropy import cross_entropy, cross_entropy_per_position
from .divergences import KINDS, divergence, divergence_from_logprobs
from .fused import fused_linear_divergence
from .reduction import reduce_positions
from .sparse import SPARSE_MODES, SparseTeacher, sample_teacher, sparse_divergence, topk_teacher
from .vocab_map import check_vocab_map, project_to_shared_support

__all__ = [
    "KINDS",
    "SPARSE_MODES",
    "DistillOutput",
    "KDSpec",
    "SparseTeacher",
    "check_vocab_map",
    "cross_entropy",
    "cross_entropy_per_position",
    "distill_loss",
    "divergence",
    "divergence_from_logprobs",
    "fused_linear_divergence",
    "kd_per_position",
    "project_to_shared_support",
    "reduce_positions",
    "sample_teacher",
    "sparse_divergence",
    "topk_teacher",
]
