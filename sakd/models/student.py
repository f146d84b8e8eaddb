"""The module the trainer hands to Accelerate: the student plus the auxiliary-loss projections.

Wrapping both in one module makes DDP and DeepSpeed treat the projections like any student parameter:
their gradients are all-reduced (DDP, ZeRO-0) or reduce-scattered (ZeRO-1/2/3), they are partitioned
under ZeRO-3, and ``accelerator.save_state`` checkpoints them with the student. Only ``module`` (the
Hugging Face student) is ever exported; :func:`student_state` strips the projections from a state dict.

The attribute is called ``module`` on purpose: code that unwraps DDP / DeepSpeed engines by following
``.module`` reaches the Hugging Face model through this wrapper too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

PREFIX = "module."


class TrainableStudent(nn.Module):
    def __init__(self, student: nn.Module, aux: nn.Module | None = None) -> None:
        super().__init__()
        self.module = student
        self.aux = aux

    @property
    def config(self) -> Any:
        return self.module.config

    def forward(
        self, *args: Any, loss_fn: Callable[[TrainableStudent], Any] | None = None, **kwargs: Any
    ) -> Any:
        """The student's forward, or with ``loss_fn`` whatever ``loss_fn(self)`` computes (the trainer runs the
        student *and* its loss here -- why: the module docstring of :mod:`sakd.training.trainer`)."""
        if loss_fn is not None:
            return loss_fn(self)
        return self.module(*args, **kwargs)

    def get_output_embeddings(self) -> nn.Module:
        return self.module.get_output_embeddings()


def student_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hugging Face student's own state dict from a :class:`TrainableStudent` one (unprefixed keys
    pass through, so a plain student's state dict is returned unchanged)."""
    if not any(k.startswith(PREFIX) for k in state):
        return state
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
