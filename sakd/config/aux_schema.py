"""The config sections of the auxiliary loss terms (``distillation.feature``, ``attention``,
``contrastive``); README, "The objective", explains each."""

from __future__ import annotations

from dataclasses import dataclass

from sakd.config.fields import documented as _f


@dataclass
class FeatureConfig:
    weight: float = _f(0.0, "Weight of the hidden-state feature loss at aligned positions (0: off).", min=0)
    kind: str = _f("mse", "Feature distance: mse or cosine (1 - cos).", choices=["mse", "cosine"])
    layer_map: list[list[int]] | None = _f(
        None,
        "[[teacher_layer, student_layer], ...] hidden-state indices (1 = after the first block). None: "
        "uniform, student layer l <- teacher layer round(l * Lt / Ls).",
    )


@dataclass
class AttentionConfig:
    weight: float = _f(
        0.0, "Weight of attention-map transfer (0: off). Needs one-to-one positions (same tokenizer).", min=0
    )
    layers: list[int] = _f(
        [-1], "Student layers (0-based; negative counts from the end) whose attention maps are matched."
    )


@dataclass
class ContrastiveConfig:
    weight: float = _f(
        0.0, "Weight of the InfoNCE loss between pooled student and teacher states (0: off).", min=0
    )
    temperature: float = _f(0.07, "InfoNCE temperature.", gt=0)
