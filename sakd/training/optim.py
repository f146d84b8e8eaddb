"""Student optimizer construction: parameter groups (no weight decay on biases and norms) and the optimizer."""

from __future__ import annotations

import re

import torch
from torch import nn

from sakd.config import OptimizationConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other 1-D parameters are not weight-decayed (standard practice)."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def lr_multiplier(name: str, rules: dict[str, float]) -> float:
    """The multiplier of the first rule whose regex matches ``name`` (``re.search``), else 1.0."""
    for pattern, mult in rules.items():
        if re.search(pattern, name):
            return mult
    return 1.0


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, rules: dict[str, float] | None = None
) -> list[dict]:
    """Optimizer groups keyed by (LR multiplier, decay or not). A multiplier of 0 freezes the parameter:
    ``requires_grad_(False)`` and no optimizer state. Each group records its ``names`` for logging."""
    rules = rules or {}
    groups: dict[tuple[float, bool], dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        mult = lr_multiplier(name, rules)
        if mult == 0.0:
            p.requires_grad_(False)
        if not p.requires_grad:
            continue
        decays = not no_decay(name, p)
        group = groups.setdefault(
            (mult, decays),
            {"params": [], "names": [], "lr": lr * mult, "weight_decay": weight_decay if decays else 0.0},
        )
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def describe_groups(groups: list[dict]) -> str:
    """One line per group: what the run prints at start."""
    return "\n".join(
        f"  lr={g['lr']:.3g} weight_decay={g['weight_decay']:g}: {len(g['params'])} tensors, "
        f"{sum(p.numel() for p in g['params']):,} params"
        for g in groups
    )


def frozen_names(model: nn.Module, rules: dict[str, float]) -> list[str]:
    """The parameters ``rules`` freeze (multiplier 0.0)."""
    return [name for name, _ in model.named_parameters() if lr_multiplier(name, rules) == 0.0]


def build_optimizer(
    model: nn.Module,
    cfg: OptimizationConfig,
    *,
    lr: float | None = None,
    rules: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """The student's optimizer; ``lr`` / ``rules`` override cfg's (a training stage's own)."""
    lr = cfg.learning_rate if lr is None else lr
    rules = cfg.lr_multipliers if rules is None else rules
    groups = param_groups(model, cfg.weight_decay, lr, rules)
    if not groups:
        raise ValueError("the lr_multipliers rules freeze every student parameter: nothing to train")
    for g in groups:
        g.pop("names")
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    kwargs = {"lr": lr, "betas": betas, "eps": cfg.adam_epsilon}
    if cfg.optimizer == "adamw":
        # PyTorch's fused kernel (CPU and CUDA; fp16 loss scaling supported): the same update as the
        # per-tensor loop; on the CPU at one thread no faster than it (`sakd bench optim`, BENCHMARKS.md)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if cfg.optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # 8-bit states (block-wise quantized moments): 2 bytes per parameter instead of 8. Paged states
        # live in CUDA unified memory and are evicted to the CPU under memory pressure (CUDA only).
        import bitsandbytes as bnb

        if cfg.optimizer == "paged_adamw_8bit" and not torch.cuda.is_available():
            raise ValueError("optimization.optimizer=paged_adamw_8bit needs a CUDA GPU; use adamw_8bit here")
        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, **kwargs)
    if cfg.optimizer == "ds_cpu_adam":
        # DeepSpeed's vectorized CPU Adam: the optimizer ZeRO-Offload expects for states kept on the CPU.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    raise ValueError(f"unknown optimizer {cfg.optimizer}")
