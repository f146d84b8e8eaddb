"""DeepSpeed JSON configs (see ds_configs/): read one, and fill its ``"auto"`` values from the sakd config
so that one file serves any batch size, accumulation, clipping or precision."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sakd.config.schema import RunConfig
from sakd.errors import ConfigError


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict (one-line errors for a missing or malformed file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"training.deepspeed: cannot read {path} ({e.strerror or e})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"training.deepspeed: {path} is not valid JSON (line {e.lineno}: {e.msg})"
        ) from None
    if not isinstance(ds, dict):
        raise ConfigError(f"training.deepspeed: {path} must hold a JSON object")
    return ds


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key) == "auto":
        section[key] = value


def fill_ds_config(ds: dict[str, Any], cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """A copy of ``ds`` with every ``"auto"`` we own replaced by the run's value.

    Batch: ``train_micro_batch_size_per_gpu`` = training.batch_size, ``gradient_accumulation_steps`` =
    training.gradient_accumulation_steps, ``train_batch_size`` = their product times the world size (or
    dropped, for DeepSpeed to derive, when the world size is not known yet). ``gradient_clipping`` =
    optimization.max_grad_norm (0: none). ``fp16.enabled`` / ``bf16.enabled`` from
    training.mixed_precision; an explicit true that contradicts it is an error. An ``optimizer`` section
    (DeepSpeed owns the optimizer) takes the learning rate, betas, epsilon and weight decay.
    """
    ds = copy.deepcopy(ds)
    t, o = cfg.training, cfg.optimization
    _fill(ds, "train_micro_batch_size_per_gpu", t.batch_size)
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation_steps)
    if ds.get("train_batch_size") == "auto":
        if world_size is None:
            del ds["train_batch_size"]
        else:
            ds["train_batch_size"] = t.batch_size * t.gradient_accumulation_steps * world_size
    _fill(ds, "gradient_clipping", o.max_grad_norm or 0.0)
    for kind in ("fp16", "bf16"):
        section = ds.get(kind)
        if not isinstance(section, dict):
            continue
        wanted = t.mixed_precision == kind
        _fill(section, "enabled", wanted)
        if section.get("enabled") is True and not wanted:
            raise ConfigError(
                f"the DeepSpeed config enables {kind} but training.mixed_precision={t.mixed_precision}; "
                f"set training.mixed_precision={kind} or use a config without {kind}"
            )
        if section.get("enabled") is False and wanted:
            raise ConfigError(
                f"training.mixed_precision={kind} but the DeepSpeed config disables {kind}; set its "
                f'"{kind}": {{"enabled": "auto"}}'
            )
    params = ds.get("optimizer", {}).get("params") if isinstance(ds.get("optimizer"), dict) else None
    if isinstance(params, dict):
        _fill(params, "lr", o.learning_rate)
        _fill(params, "betas", [o.adam_beta1, o.adam_beta2])
        _fill(params, "eps", o.adam_epsilon)
        _fill(params, "weight_decay", o.weight_decay)
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):  # the export gathers a full state dict from the shards
        _fill(zero, "stage3_gather_16bit_weights_on_model_save", True)
    return ds


def run_ds_config(path: str | Path, cfg: RunConfig, world_size: int | None) -> dict[str, Any]:
    """The DeepSpeed config a run uses: the file, filled (:func:`fill_ds_config`), with the optimizer
    rule for CPU offload applied."""
    ds = fill_ds_config(load_ds_config(path), cfg, world_size)
    if offloads_optimizer(ds):
        if cfg.optimization.optimizer != "ds_cpu_adam":
            raise ConfigError(
                f"{path} offloads the optimizer to the CPU; set optimization.optimizer=ds_cpu_adam "
                f"(got {cfg.optimization.optimizer}), or use a config without offload_optimizer"
            )
        # With this flag on, Accelerate's prepare() rebuilds any client optimizer under offload -- our
        # DeepSpeedCPUAdam included, with adamw_mode=False (L2 instead of decoupled weight decay;
        # accelerate 1.15). DeepSpeed's own check accepts DeepSpeedCPUAdam, so nothing is lost.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def zero_stage(ds: dict[str, Any] | None) -> int:
    if not ds:
        return -1
    return int((ds.get("zero_optimization") or {}).get("stage", 0))
