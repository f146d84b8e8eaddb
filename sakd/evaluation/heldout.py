"""Held-out evaluation: mean loss, perplexity (computed safely), top-1 agreement with a teacher."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sakd.models.forward import hidden_and_head

# exp(700) is finite in float64; a diverged model reports a huge but finite perplexity, never inf.
MAX_LOG_PPL = 700.0


def safe_perplexity(mean_loss: float) -> float:
    if not math.isfinite(mean_loss):
        return float(math.exp(MAX_LOG_PPL))
    return float(math.exp(min(mean_loss, MAX_LOG_PPL)))


def _chunk_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    vocab: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of CE and count of top-1 agreements over ``[N, H]`` rows, ``chunk`` rows of logits at a time."""
    ce = torch.zeros((), dtype=torch.float64, device=hidden.device)
    agree = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for lo in range(0, hidden.shape[0], chunk):
        logits = nn.functional.linear(
            hidden[lo : lo + chunk].float(),
            weight[:vocab].float(),
            None if bias is None else bias[:vocab].float(),
        )
        ce += nn.functional.cross_entropy(logits, targets[lo : lo + chunk], reduction="sum").double()
        if teacher is not None:
            th, tw, tb = teacher
            t_logits = nn.functional.linear(
                th[lo : lo + chunk].float(), tw[:vocab].float(), None if tb is None else tb[:vocab].float()
            )
            agree += (logits.argmax(-1) == t_logits.argmax(-1)).sum().double()
    return ce, agree


def rank_batches(n_blocks: int, batch_size: int, rank: int, world: int) -> Iterator[tuple[int, bool]]:
    """This rank's batch starts, and whether each counts: every rank runs the *same number* of forwards.

    A wrapped model's forward can be a collective (DDP broadcasts buffers, ZeRO-3 gathers parameters),
    so a rank that ran out of blocks keeps stepping with its last real batch (or the first one) and
    drops the result -- otherwise the other ranks wait for it forever.
    """
    stride = batch_size * world
    rounds = -(-n_blocks // stride)
    for r in range(rounds):
        lo = r * stride + rank * batch_size
        yield (lo, True) if lo < n_blocks else (0, False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    blocks: Any,
    *,
    batch_size: int,
    accelerator: Accelerator | None = None,
    unwrapped: nn.Module | None = None,
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Next-token loss of ``model`` on packed ``blocks`` (a torch-format dataset or ``[N, L]`` tensor).

    Returns ``loss`` (mean over predicted tokens), ``ppl`` and, with a ``teacher``, ``agreement`` (share
    of positions where student and teacher argmax agree).  With an ``accelerator`` each rank evaluates
    its own share of blocks and the sums are reduced across ranks.
    """
    unwrapped = unwrapped if unwrapped is not None else model
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(unwrapped.parameters()).device
    vocab = vocab_size or unwrapped.get_output_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()
    n_blocks = len(blocks)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # ce_sum, agree, tokens
    for lo, counted in rank_batches(n_blocks, batch_size, rank, world):
        ids = blocks[lo : min(lo + batch_size, n_blocks)]
        ids = torch.as_tensor(ids["input_ids"] if isinstance(ids, dict) else ids).to(device)
        s = hidden_and_head(model, unwrapped, ids)
        h = s.hidden[:, :-1].reshape(-1, s.hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1)
        t = None
        if teacher is not None:
            th = hidden_and_head(teacher, teacher, ids)
            t = (th.hidden[:, :-1].reshape(-1, th.hidden.shape[-1]), th.head_weight, th.head_bias)
        ce, agree = _chunk_stats(h, s.head_weight, s.head_bias, targets, t, vocab, chunk_size)
        if counted:
            totals += torch.stack(
                [ce, agree, torch.tensor(float(targets.numel()), dtype=torch.float64, device=device)]
            )
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    ce_sum, agree, n = totals.tolist()
    mean = ce_sum / max(n, 1.0)
    out = {"loss": mean, "ppl": safe_perplexity(mean), "tokens": int(n)}
    if teacher is not None:
        out["agreement"] = agree / max(n, 1.0)
    return out


def _head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab: int) -> torch.Tensor:
    return nn.functional.linear(
        hidden.float(), weight[:vocab].float(), None if bias is None else bias[:vocab].float()
    )


@torch.no_grad()
def cross_tokenizer_agreement(
    model: nn.Module,
    teacher: nn.Module,
    bundle: Any,
    vocab_map: torch.Tensor,
    *,
    batch_size: int,
    vocab_size: int,
    teacher_vocab_size: int,
    chunk_size: int = 1024,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """Top-1 agreement across tokenizers, on held-out blocks packed with the alignment.

    At each student position that ends on a shared boundary with the teacher (an anchor), both models
    predict the continuation of the same text; they agree when the student's argmax token maps (by the
    vocab map) to the teacher's argmax token. Returns ``agreement`` (share of anchored positions),
    ``anchored`` (share of student positions that have an anchor) and ``teacher_mass_mapped`` (mean
    teacher probability, at T = 1 and anchored positions, on teacher tokens the map reaches).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    unwrapped = accelerator.unwrap_model(model) if accelerator else model
    was_training = model.training
    model.eval()
    vmap = vocab_map.to(device)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # agree, anchored, positions, mapped mass
    mapped_t = torch.zeros(teacher_vocab_size, dtype=torch.bool, device=device)
    mapped_t[vmap[vmap >= 0]] = True
    blocks = bundle.eval
    n = len(blocks)
    for lo, counted in rank_batches(n, batch_size, rank, world):
        batch = bundle.batch(blocks, list(range(lo, min(lo + batch_size, n))))
        batch = {k: v.to(device) for k, v in batch.items()}
        s = hidden_and_head(model, unwrapped, batch["input_ids"])
        t = hidden_and_head(teacher, teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        anchor = batch["anchor"]
        ok = anchor >= 0
        t_hidden = t.hidden.gather(1, anchor.clamp_min(0).unsqueeze(-1).expand(-1, -1, t.hidden.shape[-1]))
        if not counted:
            continue
        sh, th = s.hidden[ok], t_hidden[ok]
        for c in range(0, sh.shape[0], chunk_size):
            s_arg = _head(sh[c : c + chunk_size], s.head_weight, s.head_bias, vocab_size).argmax(-1)
            t_logits = _head(th[c : c + chunk_size], t.head_weight, t.head_bias, teacher_vocab_size)
            t_arg = t_logits.argmax(-1)
            totals[3] += torch.softmax(t_logits, -1)[:, mapped_t].sum().double()
            totals[0] += (vmap[s_arg] == t_arg).sum().double()
        totals[1] += ok.sum().double()
        totals[2] += anchor.numel()
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    agree, anchored, positions, mass = totals.tolist()
    return {
        "agreement": agree / max(anchored, 1.0),
        "anchored": anchored / max(positions, 1.0),
        "teacher_mass_mapped": mass / max(anchored, 1.0),
    }
