"""The config section of the offline teacher cache (``distillation.cache``: what `sakd cache-teacher` stores);
README, "Offline teacher cache", explains the modes with their measured costs."""

from __future__ import annotations

from dataclasses import dataclass

from sakd.config.fields import documented as _f


@dataclass
class CacheConfig:
    mode: str = _f(
        "sampled",
        "What `sakd cache-teacher` stores per teacher position: topk (the k most likely ids and their "
        "log-probs), topk_tail (plus the exact log-mass of the rest), sampled (ids drawn from the teacher at "
        "the cache temperature, with counts: unbiased sampled KD, Anshumann et al. 2025; the default: with "
        "128 draws it came within live KD's seed spread on a tiny teacher where top-64 + tail did not, and "
        "within live KD's seed spread with SmolLM2-135M-Instruct on the KJV, BENCHMARKS.md 'Cache vs "
        "live teacher'; trains forward KL only).",
        choices=["topk", "topk_tail", "sampled"],
    )
    top_k: int = _f(64, "k of the topk / topk_tail modes.", min=1)
    num_samples: int = _f(
        128,
        "Draws per position, sampled mode (a repeated id is stored once: bytes grow with the teacher's "
        "entropy: 159 B/token at 128 draws for a tiny teacher, 177 for SmolLM2-135M-Instruct on the KJV).",
        min=1,
        max=65535,
    )
    temperature: float | None = _f(
        None,
        "Temperature the stored distribution is computed at (None: distillation.loss.temperature); training "
        "from the cache must use the same one.",
        gt=0,
    )
    values_dtype: str = _f(
        "float16", "Storage dtype of the log-probabilities.", choices=["float16", "bfloat16", "float32"]
    )
    router: bool = _f(False, "Also store the MoE teacher's router probabilities (layers x experts).")
    blocks_per_shard: int = _f(256, "Teacher blocks per shard file (the unit of resume).", min=1)
    batch_size: int | None = _f(None, "Blocks per teacher forward (None: training.batch_size).", min=1)
    seed: int | None = _f(None, "Seed of the sampled mode's draws (None: training.seed).")
