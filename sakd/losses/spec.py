"""The typed description of a distillation loss, built once (from the config, or by a caller) and passed
with the tensors instead of long keyword lists:

- :class:`KDSpec` -- the KD term: divergence kind, temperature, JSD beta / skew, sparse mode;
- :class:`ObjectiveSpec` -- the blend ``alpha·[T²·]KD + (1−alpha)·CE``: KD spec, alpha, label smoothing,
  T² scaling, chunk size, ignore index, reduction;
- :class:`VocabBridge` -- how a teacher with another vocabulary meets the student (cross-tokenizer);
- :class:`Targets` -- the per-position tensors of one batch: labels, masks, weights, chain-rule scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import Tensor

from .chunk_size import check_chunk_size
from .divergences import check_divergence_args
from .reduction import check_reduction
from .sparse import SPARSE_MODES


@dataclass(frozen=True)
class KDSpec:
    """What the KD term computes (everything except the tensors).

    Attributes:
        kind: divergence kind, ``fkl | rkl | jsd | skl | srkl | tvd``.
        temperature: T > 0 dividing both sides' logits.
        beta: JSD weight β (0 → forward KL, 1 → reverse KL).
        skew: DistiLLM skew α for ``skl`` / ``srkl``.
        sparse: None for the dense divergence, else ``subset | topk_tail | sampled``.
        top_k: k for ``subset`` / ``topk_tail`` built from dense teacher logits.
        num_samples: n for ``sampled`` built from dense teacher logits.
        uld_weight: with a vocab map, weight of an extra ULD term (sorted-probability distance,
            :func:`sakd.losses.uld.uld_distance`) between the student's and the teacher's
            probabilities on their *unmapped* ids, which the projection can only lump together.
    """

    kind: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    skew: float = 0.1
    sparse: str | None = None
    top_k: int = 64
    num_samples: int = 64
    uld_weight: float = 0.0

    def __post_init__(self) -> None:
        check_divergence_args(self.kind, temperature=self.temperature, beta=self.beta, skew=self.skew)
        if self.sparse is not None and self.sparse not in SPARSE_MODES:
            raise ValueError(f"unknown sparse mode {self.sparse!r}; expected None or one of {SPARSE_MODES}")
        if self.sparse == "sampled" and self.kind != "fkl":
            raise ValueError(f"sampled KD estimates forward KL only; got kind={self.kind!r}")
        if self.uld_weight < 0:
            raise ValueError(f"uld_weight must be >= 0, got {self.uld_weight}")
        if self.top_k < 1 or self.num_samples < 1:
            raise ValueError(f"top_k and num_samples must be >= 1, got {self.top_k}, {self.num_samples}")


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the blended loss ``alpha·[T²·]KD + (1−alpha)·CE`` computes (everything except the tensors).

    Attributes:
        kd: the KD term.
        alpha: KD weight in [0, 1]; 1 needs no labels.
        label_smoothing: of the CE term.
        scale_by_t2: multiply the KD term by T² (Hinton et al.) so its gradient scale is T-independent.
        chunk_size: rows per chunk of the fused loss, or ``"auto"``: sized from the number of positions and
            the vocabulary and hidden sizes (:func:`sakd.losses.chunk_size.auto_chunk_size`).
        ignore_index: label value excluded from both terms.
        reduction: ``"mean"`` over valid positions or ``"sum"`` (a trainer dividing by a global count).
    """

    kd: KDSpec = field(default_factory=KDSpec)
    alpha: float = 1.0
    label_smoothing: float = 0.0
    scale_by_t2: bool = True
    chunk_size: int | str = "auto"
    ignore_index: int = -100
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        check_chunk_size(self.chunk_size)
        check_reduction(self.reduction)

    @property
    def kd_scale(self) -> float:
        return self.kd.temperature**2 if self.scale_by_t2 else 1.0

    def at_temperature(self, temperature: float) -> ObjectiveSpec:
        """The same objective at another temperature (a temperature schedule's step)."""
        if temperature == self.kd.temperature:
            return self
        return dataclasses.replace(self, kd=dataclasses.replace(self.kd, temperature=temperature))


@dataclass(frozen=True)
class VocabBridge:
    """How the teacher's vocabulary meets the student's; both None for one shared vocabulary.

    Attributes:
        vocab_map: ``[Vs]`` teacher id per student id, or -1 (1:1 by token text; see
            :mod:`sakd.losses.vocab_map`).
        teacher_to_student: ``[Vt]`` many-to-one map (each teacher token to the student token its text
            begins with, or -1); when given the projection sums teacher probabilities through it.
    """

    vocab_map: Tensor | None = None
    teacher_to_student: Tensor | None = None

    @property
    def crosses(self) -> bool:
        """Whether the two vocabularies differ (a projection is needed)."""
        return self.vocab_map is not None or self.teacher_to_student is not None


@dataclass(frozen=True)
class Targets:
    """The per-position tensors of one batch, all ``[N]`` or ``[B, L]`` (aligned with the hidden states).

    Attributes:
        labels: next-token targets; needed when ``alpha < 1``.
        mask: bool, True = valid (positions whose label is the ignore index are excluded too).
        weights: float per-position multipliers applied to both terms.
        kd_mask: bool; KD counts only where True (a teacher anchor exists); CE takes the whole weight
            elsewhere. The normalizer stays the number of valid positions.
        target_logprob: the teacher's chain-rule log-probability (at temperature T) of each label's
            text, or NaN (cross-tokenizer, with labels).
        kd_weights: float per-position multipliers of the KD term only (a token router's weights); CE
            keeps its own weight. None: every position weighs 1 (bitwise today's loss).
        ce_weight_without_kd: CE's weight where ``kd_mask`` is False, as a share of the position's weight
            (1, the default: CE takes the whole weight there). It weighs the loss only: the returned ``ce``
            stays the plain CE (a curriculum that scales KD and CE apart reads its magnitude from it).
    """

    labels: Tensor | None = None
    mask: Tensor | None = None
    weights: Tensor | None = None
    kd_mask: Tensor | None = None
    target_logprob: Tensor | None = None
    kd_weights: Tensor | None = None
    ce_weight_without_kd: float = 1.0
