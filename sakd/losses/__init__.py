"""Distillation losses: pure functions of tensors, computed in float32.

- :func:`divergence` — fkl / rkl / jsd / skl / srkl / tvd between full logits.
- :func:`cross_entropy`, :func:`distill_loss` — CE and the blended objective on full logits.
- :func:`sparse_divergence`, :class:`SparseTeacher` — subset / top-k+tail / sampled KD.
- :func:`fused_distill` — the blended objective from hidden states and heads, chunked, described by an
  :class:`ObjectiveSpec` (+ :class:`Targets`, :class:`VocabBridge`); :func:`fused_linear_divergence` is
  the same with every option as a keyword; :func:`fused_linear_cross_entropy` the CE alone, the same way.
- :func:`over_chunks`, :class:`Head` — any per-chunk work on ``hidden @ head.T`` logits.
- :func:`auto_chunk_size`, :func:`resolve_chunk_size` — rows per chunk for ``chunk_size="auto"``.
"""

from .blend import DistillOutput, distill_loss, kd_per_position
from .chunk_size import auto_chunk_size, resolve_chunk_size
from .chunked import Head, over_chunks
from .cross_entropy import cross_entropy, cross_entropy_per_position
from .divergences import KINDS, divergence, divergence_from_logprobs
from .draws import BlockDraws
from .fused import HeadInput, fused_distill, fused_linear_divergence
from .fused_ce import fused_linear_cross_entropy
from .reduction import reduce_positions
from .sparse import SPARSE_MODES, SparseTeacher, sample_teacher, sparse_divergence, topk_teacher
from .spec import KDSpec, ObjectiveSpec, Targets, VocabBridge
from .vocab_map import check_vocab_map, project_to_shared_support

__all__ = [
    "BlockDraws",
    "KINDS",
    "SPARSE_MODES",
    "DistillOutput",
    "Head",
    "HeadInput",
    "KDSpec",
    "ObjectiveSpec",
    "SparseTeacher",
    "Targets",
    "VocabBridge",
    "auto_chunk_size",
    "check_vocab_map",
    "cross_entropy",
    "cross_entropy_per_position",
    "distill_loss",
    "divergence",
    "divergence_from_logprobs",
    "fused_distill",
    "fused_linear_cross_entropy",
    "fused_linear_divergence",
    "kd_per_position",
    "over_chunks",
    "project_to_shared_support",
    "reduce_positions",
    "resolve_chunk_size",
    "sample_teacher",
    "sparse_divergence",
    "topk_teacher",
]
