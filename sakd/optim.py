"""Student optimizer construction: parameter groups (no weight decay on biases and norms) and the optimizer."""

from __future__ import annotations

import torch
from torch import nn

from sakd.config import OptimizationConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-D parameters are not weight-decayed (standard practice)."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, plain = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizationConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon)
    raise ValueError(f"unknown optimizer {cfg.optimizer}")
