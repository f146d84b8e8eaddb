"""An exponential moving average (EMA) of the student's weights.

Built on :class:`torch.optim.swa_utils.AveragedModel` with :func:`get_ema_multi_avg_fn` (a fused
``torch._foreach_lerp_``). That function takes a fixed decay, so the warm-up is a thin wrapper that
builds it with the decay of the current update, read from the ``n_averaged`` count AveragedModel
keeps:

    ema_0 = the weights at the start;  after optimizer step k (k = 1, 2, ...):
    ema_k = d_k * ema_{k-1} + (1 - d_k) * w_k,   d_k = min(decay, (1 + k) / (W + k))   (W > 0)

(``d_k = decay`` when W = 0). The average lives on the student's device in the student's master dtype;
buffers are copied, not averaged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EMA_FILE = "ema.safetensors"


def ema_decay_at(update: int, decay: float, warmup_steps: int) -> float:
    """The decay of EMA update number ``update`` (1-based: the first optimizer step is update 1)."""
    if warmup_steps <= 0:
        return decay
    return min(decay, (1 + update) / (warmup_steps + update))


class StudentEMA:
    """The EMA of ``model``'s parameters, starting at its current weights."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int) -> None:
        self.decay, self.warmup_steps = decay, warmup_steps
        self.averaged = AveragedModel(model, multi_avg_fn=self._average)
        self.averaged.requires_grad_(False)
        self.averaged.update_parameters(model)  # the first call copies: ema_0 = the current weights

    def _average(self, ema_params: list, model_params: list, n_averaged: torch.Tensor) -> None:
        decay = ema_decay_at(int(n_averaged), self.decay, self.warmup_steps)
        get_ema_multi_avg_fn(decay)(ema_params, model_params, n_averaged)

    @property
    def module(self) -> nn.Module:
        """The averaged copy of the model (a plain module: evaluate it, save it)."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far (0 at the start)."""
        return int(self.averaged.n_averaged) - 1

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights in; call after each optimizer step that was taken."""
        self.averaged.update_parameters(model)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name (tied weights once, as ``named_parameters`` lists them)."""
        return {name: p.detach().contiguous() for name, p in self.module.named_parameters()}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / EMA_FILE
        save_file(self.tensors(), str(path), metadata={"updates": str(self.updates)})
        return path

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """Restore weights and update count saved by :meth:`save` (bitwise: resume stays exact)."""
        params = dict(self.module.named_parameters())
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            updates = int(fh.metadata()["updates"])
            if set(fh.keys()) != set(params):
                raise ValueError(f"{path} does not match the student's parameters")
            for name in fh.keys():
                params[name].copy_(fh.get_tensor(name))
        self.averaged.n_averaged.fill_(updates + 1)
