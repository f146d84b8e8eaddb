"""The ``distillation.generation`` section: on-policy and sequence-level distillation (the student or the
teacher writes the text the student learns on). ``distillation.policy`` picks the mode; this section holds
the sampling settings, the prompt source and the evaluation of what the student writes.

A module of its own so that :mod:`sakd.config.schema` stays readable; the section is part of the same
typed tree (unknown keys rejected, every field documented and range-checked by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sakd.errors import ConfigError

POLICIES = ("off", "on", "mixed", "sequence")


def _f(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass
class GenerationConfig:
    fraction: float = _f(
        0.5,
        "policy=mixed: share lambda of optimizer steps trained on the student's own samples (GKD); the "
        "others are this project's off-policy KD on the data (the distillation.loss blend with CE, at "
        "distillation.loss.temperature with T^2, on every token), not GKD's off-policy steps. Each step's "
        "choice is a pure function of (seed, step).",
        min=0,
        max=1,
    )
    max_new_tokens: int = _f(64, "Tokens generated per prompt (generation stops earlier at EOS).", min=1)
    temperature: float = _f(
        1.0,
        "Sampling temperature of the generator (1: the model's own distribution). It shapes only the "
        "sampling: on-policy steps score the student's samples at T = 1 without a T^2 factor (GKD), "
        "whatever distillation.loss.temperature is.",
        gt=0,
    )
    top_p: float = _f(
        1.0, "Nucleus sampling: keep the smallest set of tokens with this much mass.", gt=0, max=1
    )
    prompts: str = _f(
        "train",
        "Where prompts come from: train (the first prompt_tokens tokens of each training block of the "
        "step, inside one document with within_document packing; data.format=chat: the training "
        "conversations cut at their last user turn) or a local .txt / .jsonl / .json / .parquet file (one "
        "prompt per line / record; text only).",
    )
    prompt_field: str = _f("text", "Column holding the prompt in a .jsonl / .json / .parquet prompt file.")
    prompt_tokens: int = _f(
        32,
        "Prompt length in tokens: the prefix cut from each training block (prompts=train), or the most "
        "tokens kept from the end of a prompt from a file; data.format=chat: the longest rendered prompt "
        "kept (conversations with longer prompts are left out).",
        min=1,
    )
    sequence_loss: str = _f(
        "ce",
        "policy=sequence: ce trains the student on the teacher's samples with cross-entropy (Kim & Rush "
        "2016, sequence-level KD); kd uses the distillation.loss blend on them (word-level KD on top).",
        choices=["ce", "kd"],
    )
    eval_prompts: int | None = _f(
        None,
        "Held-out prompts (prefixes of held-out blocks; chat: held-out conversations cut at their last user "
        "turn, scored under the teacher's template) whose greedy and sampled student continuations the "
        "teacher scores at the end of the run (summary: teacher_nll_*). None: 32 when policy is not off, "
        "else 0 (off).",
        min=0,
    )


def resolved_eval_prompts(policy: str, gcfg: GenerationConfig) -> int:
    """How many held-out prompts the end-of-run continuation evaluation uses."""
    if gcfg.eval_prompts is not None:
        return gcfg.eval_prompts
    return 32 if policy != "off" else 0


def check_generation(policy: str, gcfg: GenerationConfig, block_size: int) -> None:
    """Cross-field checks of the on-policy settings (the loader calls it)."""
    if policy == "off":
        return
    if gcfg.prompts == "train" and gcfg.prompt_tokens >= block_size:
        raise ConfigError(
            f"distillation.generation.prompt_tokens={gcfg.prompt_tokens} must be smaller than data.block_size="
            f"{block_size} (prompts are prefixes cut from the training blocks)"
        )
