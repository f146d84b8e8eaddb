#!/usr/bin/env python3
"""Training steps of a CE-only student through sakd's objective (``alpha: 0``: CE baselines, teacher
pretraining), for timing the whole process from outside, one commit against another.

    OMP_NUM_THREADS=1 /usr/bin/time -v python benchmarks/ce_step.py [PRESET] [STEPS]

PRESET is a student preset (default ``small-llama-15m``) built with the SmolLM2 vocabulary size (49,152),
random init; each step is a forward of 8 × 128 random tokens, the objective, backward and an AdamW step.
Prints the last step's summed CE (equal up to float rounding between implementations of the same loss).
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM

from sakd.config import LossConfig
from sakd.models.forward import hidden_and_head
from sakd.models.presets import build_preset_config
from sakd.objective.composite import Objective

VOCAB = 49152


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "small-llama-15m"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_preset_config(name, vocab_size=VOCAB))
    objective = Objective(LossConfig(alpha=0.0), vocab_size=VOCAB)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, VOCAB, (8, 128))
    loss = torch.zeros(())
    for _ in range(steps):
        out = objective(hidden_and_head(model, model, ids), None, ids, temperature=1.0)
        (out.loss_sum / out.num_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = out.loss_sum.detach()
    print(f"{name}: {steps} steps, last summed CE {loss.item():.4f}")


if __name__ == "__main__":
    main()
