"""The trainable projections of the auxiliary losses (feature, attention, contrastive), which layers they
pair, and how they are built from the config. They train with the student, are checkpointed with it,
and are never exported."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sakd.losses.auxiliary import attention_transfer_loss, feature_loss, info_nce, masked_mean_pool

log = logging.getLogger(__name__)


def layer_pairs(
    teacher_layers: int, student_layers: int, mapping: str | Sequence[Sequence[int]] = "uniform"
) -> list[tuple[int, int]]:
    """``(teacher layer, student layer)`` pairs for feature matching, as ``hidden_states`` indices.

    Index 0 (the embedding output) is excluded; layers are ``1..L``.

    - ``"uniform"``: student layer ``l`` (1..Ls) ↦ teacher layer ``round(l · Lt / Ls)``, rounding
      halves up (exact integer arithmetic) and clamped to ≥ 1, so the last student layer always
      meets the last teacher layer. E.g. Lt=4, Ls=2 → ``[(2, 1), (4, 2)]``.
    - explicit: a list of ``[teacher_layer, student_layer]`` pairs, validated against the ranges.

    Raises:
        ValueError: (one line) on a non-positive layer count, an unknown mapping string, a
            malformed pair, or a layer out of range.
    """
    if teacher_layers < 1 or student_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got teacher={teacher_layers}, student={student_layers}")
    if isinstance(mapping, str):
        if mapping != "uniform":
            raise ValueError(f"unknown layer mapping {mapping!r}; expected 'uniform' or a list of pairs")
        return [
            (max(1, (2 * s * teacher_layers + student_layers) // (2 * student_layers)), s)
            for s in range(1, student_layers + 1)
        ]
    pairs = []
    for pair in mapping:
        if len(pair) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair):
            raise ValueError(f"layer pair {pair!r} must be [teacher_layer, student_layer] ints")
        teacher, student = pair
        if not (1 <= teacher <= teacher_layers and 1 <= student <= student_layers):
            raise ValueError(
                f"layer pair {list(pair)} out of range: teacher layers are 1..{teacher_layers}, "
                f"student layers 1..{student_layers}"
            )
        pairs.append((teacher, student))
    return pairs


def group_average_init(weight: Tensor) -> None:
    """Fill a head-projection weight ``[Hs, Ht]`` in place: student head j averages teacher heads
    ``j·g … (j+1)·g − 1`` (g = Ht / Hs) when Ht is a multiple of Hs, else every entry is 1/Ht."""
    student_heads, teacher_heads = weight.shape
    with torch.no_grad():
        if teacher_heads % student_heads == 0:
            group = teacher_heads // student_heads
            weight.zero_()
            for j in range(student_heads):
                weight[j, j * group : (j + 1) * group] = 1.0 / group
        else:
            weight.fill_(1.0 / teacher_heads)


class AuxiliaryHeads(nn.Module):
    """Trainable projections for the auxiliary losses (optimize them with the student).

    Attributes:
        feature_layers: the ``(teacher layer, student layer)`` pairs (``hidden_states`` indices).
        feature_proj: ``nn.ModuleList`` of ``Linear(teacher_hidden, student_hidden)``, one per
            pair; identity-initialized (zero bias) when the hidden sizes are equal, PyTorch's
            default init otherwise.
        attention_proj: ``Linear(teacher_heads, student_heads, bias=False)`` acting on the head
            axis, group-average initialized (:func:`group_average_init`); None unless
            ``attention``.
        contrastive_student / contrastive_teacher: ``Linear(student_hidden, D)`` /
            ``Linear(teacher_hidden, D)`` into a shared space, ``D = contrastive_dim`` or
            ``student_hidden``; None unless ``contrastive``.

    Every teacher input is detached before it is projected.
    """

    def __init__(
        self,
        teacher_hidden: int,
        student_hidden: int,
        *,
        feature_layers: Sequence[tuple[int, int]] = (),
        teacher_heads: int | None = None,
        student_heads: int | None = None,
        attention: bool = False,
        contrastive: bool = False,
        contrastive_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.feature_layers = [(int(t), int(s)) for t, s in feature_layers]
        self.feature_proj = nn.ModuleList(
            nn.Linear(teacher_hidden, student_hidden) for _ in self.feature_layers
        )
        if teacher_hidden == student_hidden:
            with torch.no_grad():
                for proj in self.feature_proj:
                    proj.weight.copy_(torch.eye(student_hidden))
                    proj.bias.zero_()
        self.attention_proj: nn.Linear | None = None
        if attention:
            if not teacher_heads or not student_heads:
                raise ValueError("attention transfer needs teacher_heads and student_heads")
            self.attention_proj = nn.Linear(teacher_heads, student_heads, bias=False)
            group_average_init(self.attention_proj.weight)
        self.contrastive_student: nn.Linear | None = None
        self.contrastive_teacher: nn.Linear | None = None
        if contrastive:
            dim = contrastive_dim or student_hidden
            self.contrastive_student = nn.Linear(student_hidden, dim)
            self.contrastive_teacher = nn.Linear(teacher_hidden, dim)

    def project_feature(self, i: int, teacher_h: Tensor) -> Tensor:
        """Project (detached) teacher hidden states ``[..., Ht]`` of pair ``i`` to ``[..., Hs]``."""
        proj = self.feature_proj[i]
        return proj(teacher_h.detach().to(proj.weight.dtype))

    def feature_losses(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        *,
        kind: str = "mse",
        mask: Tensor | None = None,
    ) -> Tensor:
        """Mean over :attr:`feature_layers` of :func:`feature_loss` (each a sum over valid rows), so the
        term's weight does not grow with the number of layer pairs.

        Args:
            student_hidden_states: the student's ``hidden_states`` tuple (``[B, L, Hs]`` each).
            teacher_hidden_states: the teacher's ``hidden_states`` tuple (``[B, L, Ht]`` each).
            kind: ``"mse"`` or ``"cosine"``.
            mask: ``[B, L]`` bool valid positions (aligned sequences required).
        """
        if not self.feature_layers:
            raise ValueError("no feature layer pairs configured")
        total = None
        for i, (t, s) in enumerate(self.feature_layers):
            teacher = teacher_hidden_states[t]
            if mask is not None:  # zero masked rows before projecting: no inf·0 in the weight gradient
                teacher = torch.where(mask.unsqueeze(-1), teacher, 0.0)
            loss = feature_loss(student_hidden_states[s], self.project_feature(i, teacher), kind, mask)
            total = loss if total is None else total + loss
        return total / len(self.feature_layers)

    def attention_loss(
        self, student_attn: Tensor, teacher_attn: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """:func:`attention_transfer_loss` with :attr:`attention_proj` (sum over valid query rows)."""
        if self.attention_proj is None:
            raise ValueError("AuxiliaryHeads was built with attention=False")
        return attention_transfer_loss(student_attn, teacher_attn, self.attention_proj, mask)

    def contrastive_pair(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        student_mask: Tensor,
        teacher_mask: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Mean-pool each side over its own valid positions and project to the shared space.

        Args:
            student_hidden: ``[B, Ls, Hs]``; teacher_hidden: ``[B, Lt, Ht]`` (detached here).
            student_mask: ``[B, Ls]`` bool; teacher_mask: ``[B, Lt]`` bool (the two sequences
                may come from different tokenizers).

        Returns:
            ``(student [B, D], teacher [B, D])`` ready for :func:`info_nce`.
        """
        if self.contrastive_student is None or self.contrastive_teacher is None:
            raise ValueError("AuxiliaryHeads was built with contrastive=False")
        student = masked_mean_pool(student_hidden, student_mask)
        teacher = masked_mean_pool(teacher_hidden.detach(), teacher_mask)
        s_proj, t_proj = self.contrastive_student, self.contrastive_teacher
        return s_proj(student.to(s_proj.weight.dtype)), t_proj(teacher.to(t_proj.weight.dtype))

    def contrastive_loss(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        student_mask: Tensor,
        teacher_mask: Tensor,
        *,
        temperature: float = 0.07,
    ) -> Tensor:
        """:func:`info_nce` on :meth:`contrastive_pair` (mean over the batch)."""
        student, teacher = self.contrastive_pair(student_hidden, teacher_hidden, student_mask, teacher_mask)
        return info_nce(student, teacher, temperature)
