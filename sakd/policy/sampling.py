"""Batched generation with a KV cache (``transformers`` ``generate``), deterministic per prompt.

**Why the Gumbel-max trick.** ``generate(do_sample=True)`` draws every row of the batch from the global RNG
in one call, so a row's sample depends on the rows beside it -- on how a step is split into micro-batches
and ranks -- and on everything that used the RNG before. Here each row has its own generator, seeded
from ``(seed, step, sample id, role)`` (:func:`row_seed`), and decoding is greedy over
``logits / T`` (top-p filtered) plus Gumbel noise from that generator: ``argmax(log p + G)`` with
``G ~ Gumbel(0, 1)`` is an exact sample of ``p`` (Gumbel 1954; the standard "Gumbel-max trick"). So a
prompt's continuation depends only on the model and those four numbers: the same on 1 process or 2 ranks,
with 1 micro-batch of 8 or 4 of 2, and after a resume (``tests/test_policy.py``).

The model's own ``generation_config`` (a checkpoint's ``generation_config.json``: sampling, repetition
penalties, beams) is set aside for the call: ``generate`` merges its values into any config it is given,
and they would change the distribution the student is trained on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, sample id, role): each folded in through splitmix64, so
    neighbouring steps or ids give unrelated streams."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt: ``greedy``, or sampling at ``temperature`` within ``top_p`` mass."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


class _VocabLimit(LogitsProcessor):
    """Never emit an id the tokenizer does not have (heads are often padded past the tokenizer)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[-1] <= self.vocab:
            return scores
        scores = scores.clone()
        scores[:, self.vocab :] = float("-inf")
        return scores


class SeededGumbel(LogitsProcessor):
    """Adds Gumbel(0, 1) noise drawn from one generator per row; greedy decoding then samples."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        v = scores.shape[-1]
        u = torch.stack(
            [torch.rand(v, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
        return scores.float() + gumbel


@contextlib.contextmanager
def _plain_generation_config(model: Any) -> Iterator[None]:
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` ids and attention mask, each prompt right-aligned (decoder-only generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling,
    *,
    seeds: Sequence[int],
    tokenizer: Any,
    synced_gpus: bool = False,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """Each prompt's continuation (up to and including the first EOS or ``stop_ids`` token; at most
    ``max_new_tokens``).

    Args:
        model: a bare Hugging Face causal LM (not a DDP / DeepSpeed wrapper: see
            :func:`sakd.policy.engines.student_for_generation`).
        prompts: token ids per row (lengths may differ; they are left-padded).
        sampling: greedy or sampled decoding (:class:`Sampling`).
        seeds: one per row (:func:`row_seed`); unused when greedy.
        tokenizer: gives EOS, pad and the vocabulary size.
        synced_gpus: keep every rank stepping until all ranks are done (a model whose forward is a
            collective: a ZeRO-3 engine gathering parameters per layer).
        stop_ids: more tokens that end a continuation (a chat template's end-of-turn token).
    """
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
    stops = [eos, *(int(i) for i in stop_ids if i != eos)]
    ids, mask = left_pad(prompts, pad)
    processors: list[LogitsProcessor] = [_VocabLimit(len(tokenizer))]
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(SeededGumbel(seeds, device))
    config = GenerationConfig(
        do_sample=False,  # argmax of the (noised) scores: sampling happens in SeededGumbel
        num_beams=1,
        max_new_tokens=sampling.max_new_tokens,
        eos_token_id=stops if len(stops) > 1 else eos,
        pad_token_id=pad,
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        with _plain_generation_config(model):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=LogitsProcessorList(processors),
                synced_gpus=synced_gpus,
            )
    finally:
        model.train(was_training)
    completions = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        completions.append(row[:cut])
    return completions
