"""The old system's flat config keys (its configs/improved_config.json) and where they go in sakd."""

from __future__ import annotations

from typing import Any

# The old system's flat keys (configs/improved_config.json) -> sakd dotted keys.
SEED_KEY_MAP: dict[str, str] = {
    "teacher_model": "model.teacher",
    "student_model": "model.student",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "optimization.learning_rate",
    "num_epochs": "training.num_epochs",
    "warmup_steps": "optimization.warmup_steps",
    "eval_steps": "training.eval_every",
    "save_steps": "training.save_every",
    "max_length": "data.block_size",
    "temperature": "distillation.loss.temperature",
    "min_temperature": "distillation.loss.min_temperature",
    "label_smoothing": "distillation.loss.label_smoothing",
    "kd_top_k": "distillation.loss.kd_top_k",
    "weight_decay": "optimization.weight_decay",
    "max_grad_norm": "optimization.max_grad_norm",
    "seed": "training.seed",
    "output_dir": "training.output_dir",
    "project_name": "logging.project",
    "use_ema": "training.ema",
    "ema_decay": "training.ema_decay",
    "early_stopping_patience": "training.early_stopping_patience",
    "early_stopping_min_delta": "training.early_stopping_min_delta",
    "use_curriculum": "distillation.curriculum.phases",
}

# Seed keys whose capability has not landed yet: reported on load (see README).
SEED_KEYS_NOT_YET_SUPPORTED: dict[str, str] = {
    "attention_layers": "a count of layers, not mapped: attention transfer is distillation.attention.weight "
    "with an explicit distillation.attention.layers list (e.g. [-2, -1])",
    "memory_threshold": "has no equivalent: use `sakd plan` to choose a configuration that fits",
}


def seed_key_value(key: str, value: Any) -> list[tuple[str, Any]]:
    """Translate one seed key; returns dotted (key, value) pairs. Some keys map to two fields."""
    if key == "use_temperature_curriculum":
        return [("distillation.loss.temperature_schedule", "linear" if value else "constant")]
    if key == "kd_top_k":
        return [
            ("distillation.loss.kd_top_k", value),
            ("distillation.loss.sparse", "subset" if value else "none"),
        ]
    if key == "use_wandb":
        return [("logging.report_to", "wandb" if value else "none")]
    return [(SEED_KEY_MAP[key], value)]


SEED_EXTRA_KEYS = {"use_temperature_curriculum", "use_wandb"}
