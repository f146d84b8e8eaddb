"""Learning-rate schedules, defined in optimizer steps, under ``transformers.get_scheduler``'s names.

Why not ``transformers.get_scheduler`` itself: it lives in ``transformers.optimization``, which imports
``transformers.trainer_utils``, which imports ``peft``, which imports ``bitsandbytes`` (and, with kernels
0.19, a hub trust check that logs on every start) -- on every run, 8-bit options or not. The formulas are
transformers' (warmup from 0, then linear / half-cosine / constant / inverse square root);
``tests/test_schedules.py`` checks every name against ``get_scheduler`` step by step.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, *, warmup: int, total: int, floor: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)) * (1 - floor) + floor)


def _constant(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    shift = timescale - warmup
    return 1.0 / math.sqrt((step + shift) / timescale)


SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr", "inverse_sqrt")


def build_scheduler(
    name: str, optimizer: Optimizer, *, warmup: int, total: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A ``LambdaLR`` over ``total`` optimizer steps with ``warmup`` linear warmup steps.

    ``min_lr_ratio`` is the floor of ``cosine_with_min_lr`` as a share of the peak learning rate.
    """
    if name == "linear":
        fn = partial(_linear, warmup=warmup, total=total)
    elif name == "cosine":
        fn = partial(_cosine, warmup=warmup, total=total)
    elif name == "cosine_with_min_lr":
        fn = partial(_cosine, warmup=warmup, total=total, floor=min_lr_ratio)
    elif name == "constant":
        fn = partial(_constant, warmup=0)
    elif name == "constant_with_warmup":
        fn = partial(_constant, warmup=warmup)
    elif name == "inverse_sqrt":
        fn = partial(_inverse_sqrt, warmup=warmup, timescale=warmup or 10_000)
    else:
        raise ValueError(f"unknown lr_scheduler {name!r}; one of {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, fn)
