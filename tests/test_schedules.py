"""sakd's LR schedules give transformers.get_scheduler's learning rate at every optimizer step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import get_scheduler

from sakd.training.schedules import SCHEDULES, build_scheduler


def _rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize(("warmup", "total"), [(0, 7), (3, 20), (5, 5)])
def test_schedule_matches_transformers(name: str, warmup: int, total: int) -> None:
    extra = {"min_lr_rate": 0.2} if name == "cosine_with_min_lr" else {}
    ours = build_scheduler(name, _optimizer(), warmup=warmup, total=total, min_lr_ratio=0.2)
    ref = get_scheduler(
        name, _optimizer(), num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra
    )
    assert _rates(ours, total + 3) == pytest.approx(_rates(ref, total + 3), rel=1e-12, abs=1e-15)


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown lr_scheduler 'cosin'"):
        build_scheduler("cosin", _optimizer(), warmup=0, total=3)


def test_training_path_imports_no_bitsandbytes() -> None:
    """An fp32 run's code path (trainer, optimizers, schedules) leaves bitsandbytes and peft unimported."""
    code = (
        "import sys, sakd.training.trainer, sakd.training.stages, sakd.commands.demo; "
        "print(sorted(m for m in ('bitsandbytes', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
