"""On-policy and sequence-level distillation: the student (or the teacher) writes the text the student learns
on, scored by the teacher -- also across tokenizers.

:mod:`.rollout` (each step's data under ``distillation.policy``), :mod:`.prompts` (where prompts come from),
:mod:`.sampling` (batched, seeded generation with a KV cache), :mod:`.engines` (which module generates under
DDP / ZeRO-2 / ZeRO-3), :mod:`.retokenize` (generated text in the other tokenizer, aligned by character
spans), :mod:`.batches` (generated sequences to a training micro-batch, with prompt masking),
:mod:`.continuations` (the teacher's loss on the student's own continuations of held-out prompts),
:mod:`.chat_answers` / :mod:`.chat_eval` (the same over conversations: prompts cut at the last user turn,
each model reading its own chat template).
"""

from sakd.policy.continuations import (
    ContinuationSpec,
    RunContinuations,
    build_continuations,
    continuation_summary,
    heldout_prompts,
    score_continuations,
)
from sakd.policy.models import Models
from sakd.policy.rollout import PolicyRunner, Rollout, build_policy, is_policy_step
from sakd.policy.sampling import Sampling, generate, row_seed

__all__ = [
    "ContinuationSpec",
    "Models",
    "PolicyRunner",
    "Rollout",
    "Sampling",
    "build_policy",
    "RunContinuations",
    "build_continuations",
    "continuation_summary",
    "generate",
    "heldout_prompts",
    "is_policy_step",
    "row_seed",
    "score_continuations",
]
