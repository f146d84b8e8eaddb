"""Schedules of the objective over training (temperature now; loss phases with the auxiliary losses)."""

from __future__ import annotations

import math

from sakd.config import LossConfig


def temperature_at(cfg: LossConfig, step: int, total_steps: int) -> float:
    """Temperature at optimizer ``step`` of ``total_steps``: from ``temperature`` to ``min_temperature``.

    The seed's curriculum annealed 3.0 -> 2.0 (``use_temperature_curriculum``); ``linear`` reproduces it.
    """
    if cfg.temperature_schedule == "constant" or cfg.min_temperature is None or total_steps <= 1:
        return cfg.temperature
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    if cfg.temperature_schedule == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return cfg.temperature + (cfg.min_temperature - cfg.temperature) * frac
