"""The config section of PEFT students (``model.peft``: LoRA / DoRA adapters through `peft`); README,
"PEFT students", explains them."""

from __future__ import annotations

from dataclasses import dataclass

from sakd.config.fields import documented as _f


@dataclass
class PeftConfig:
    method: str = _f(
        "none",
        "none: train every student weight; lora / dora: train low-rank adapters through `peft` on a frozen "
        "base (DoRA also learns a magnitude per output). Export merges them (sakd export --adapter: alone).",
        choices=["none", "lora", "dora"],
    )
    rank: int = _f(16, "Adapter rank r.", min=1)
    alpha: float = _f(32.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.", gt=0)
    dropout: float = _f(0.0, "Dropout on the adapters' input.", min=0, lt=1)
    target_modules: list[str] = _f(
        ["all-linear"],
        "Modules that get adapters: names or name suffixes (q_proj, v_proj, ...), or [all-linear] for every "
        "linear layer except the output head.",
    )
    modules_to_save: list[str] = _f(
        [], "Modules trained in full next to the adapters (e.g. embed_tokens, lm_head)."
    )
    quantize_base: str = _f(
        "none",
        "QLoRA: load the frozen base in 4-bit (nf4, bitsandbytes), computing in model.student_dtype. CUDA only.",
        choices=["none", "4bit"],
    )
