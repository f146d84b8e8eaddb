"""The config reference as Markdown (README section; `sakd config-reference`), from the dataclasses."""

from __future__ import annotations

import dataclasses
import json

from sakd.config.legacy_keys import SEED_KEY_MAP, SEED_KEYS_NOT_YET_SUPPORTED
from sakd.config.schema import RunConfig, field_types, is_dataclass_type


def reference_markdown() -> str:
    """The config reference as a Markdown table (README section; `sakd config-reference`)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = field_types(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if is_dataclass_type(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_ = f.metadata.get("help", "")
            if "choices" in f.metadata:
                help_ += " One of: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
            lines.append(f"| `{prefix}{f.name}` | `{json.dumps(default)}` | {help_} |")

    walk(RunConfig, "")
    lines += ["", "Keys of the old system's `configs/improved_config.json`, accepted at the top level:", ""]
    lines += ["| seed key | sakd key |", "|---|---|"]
    for k, v in SEED_KEY_MAP.items():
        lines.append(
            f"| `{k}` | `{v}`"
            + (" (and `distillation.loss.sparse: subset`)" if k == "kd_top_k" else "")
            + " |"
        )
    lines.append(
        "| `use_temperature_curriculum` | `distillation.loss.temperature_schedule: linear` (true) / `constant` |"
    )
    lines.append("| `use_wandb` | `logging.report_to: wandb` |")
    for k, why in SEED_KEYS_NOT_YET_SUPPORTED.items():
        lines.append(f"| `{k}` | reported, not applied: {why} |")
    return "\n".join(lines) + "\n"
