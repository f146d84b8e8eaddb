"""Which layers the auxiliary terms pair (:func:`layer_pairs`) and the attention head projection's
initialisation (:func:`group_average_init`); the projections themselves belong to their terms
(:mod:`sakd.objective.terms`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
