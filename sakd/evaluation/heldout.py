"""Held-out evaluation: next-token loss, perplexity (computed safely), bits per byte and top-1 agreement
with a teacher, over a token stream scored window by window (:mod:`sakd.evaluation.windows`: blocked or
strided), every scored token counted once.

Bits per byte = (total next-token NLL over the scored tokens) / (UTF-8 bytes of the text those tokens
cover) / ln 2. The tokens and bytes are those of the evaluated text only: the packing EOS is never a
target and covers no bytes, and a token that is not scored (a window's first, in blocked scoring) takes
its bytes with it. Unlike perplexity per token, it does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sakd.data.bundle import IGNORE_INDEX
from sakd.data.documents import document_mask
from sakd.data.stream import TokenStream
from sakd.evaluation.windows import Window, method_name, plan_windows
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


def _window_batch(
    stream: TokenStream, windows: list[Window]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``[B, W]`` ids of a batch of windows (a short last window right-padded: causal attention keeps the
    padding out of every real position), ``[B, W-1]`` the scored targets, ``[B, W-1]`` their stream index,
    and -- when the stream has document positions -- the windows' document mask (:mod:`sakd.data.documents`)."""
    width = max(w.end - w.begin for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    docs = None if stream.positions is None else torch.zeros(len(windows), width, dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : w.end - w.begin] = stream.ids[w.begin : w.end]
        if docs is not None:
            docs[i, : w.end - w.begin] = document_mask(stream.positions[w.begin : w.end].unsqueeze(0))[0]
    begin, first, end = (
        torch.tensor([getattr(w, f) for w in windows]).unsqueeze(1) for f in ("begin", "first", "end")
    )
    target = begin + 1 + torch.arange(width - 1).unsqueeze(0)  # stream index of each position's target
    at = target.clamp(max=len(stream) - 1)
    mask = (target >= first) & (target < end) & stream.scored()[at]
    return ids, mask, at, docs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    heldout: TokenStream | Any,
    *,
    batch_size: int,
    window: int | None = None,
    stride: int | None = None,
    eos_id: int | None = None,
    accelerator: Accelerator | None = None,
    unwrapped: nn.Module | None = None,
    teacher: nn.Module | None = None,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Next-token loss of ``model`` on held-out text, scored in windows of ``window`` tokens advanced by
    ``stride`` (None: blocked).

    ``heldout`` is a :class:`TokenStream`, or packed blocks (a torch-format dataset or ``[N, L]`` tensor:
    their stream, ``window`` defaulting to the block length, ``eos_id`` the packing EOS that is not scored;
    :meth:`sakd.data.DataBundle.heldout` does this for a run's blocks). Returns ``loss`` (mean NLL per
    scored token), ``ppl``, ``tokens`` (scored), ``method``/``window``/``stride``, and -- when the stream
    has byte counts -- ``bytes`` (of the scored tokens) and ``bpb``; with a ``teacher`` sharing the
    vocabulary, ``agreement`` (share of scored positions where both argmaxes agree). With an
    ``accelerator`` each rank scores its share of the windows and the sums are reduced across ranks.
    """
    if not isinstance(heldout, TokenStream):
        if window is None:
            first = heldout[0]
            window = len(first["input_ids"] if isinstance(first, dict) else first)
        heldout = TokenStream.from_blocks(heldout, eos_id)
    elif window is None:
        raise ValueError("evaluate() needs window= to score a TokenStream")
    unwrapped = unwrapped if unwrapped is not None else model
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(unwrapped.parameters()).device
    vocab = vocab_size or unwrapped.get_output_embeddings().weight.shape[0]
    windows = plan_windows(len(heldout), window, stride)
    nbytes = heldout.nbytes
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # nll_sum, agree, tokens, bytes
    for lo, counted in rank_batches(len(windows), batch_size, rank, world):
        ids, mask, at, docs = _window_batch(heldout, windows[lo : lo + batch_size])
        ids, mask = ids.to(device), mask.to(device)
        docs = None if docs is None else docs.to(device)
        s = hidden_and_head(model, unwrapped, ids, docs)
        h = s.hidden[:, :-1][mask]
        targets = ids[:, 1:][mask]
        t = None
        if teacher is not None:
            th = hidden_and_head(teacher, teacher, ids, docs)
            t = (th.hidden[:, :-1][mask], th.head_weight, th.head_bias)
        ce, agree = _chunk_stats(h, s.head_weight, s.head_bias, targets, t, vocab, chunk_size)
        if counted:
            n_bytes = 0.0 if nbytes is None else float(nbytes[at[mask.cpu()]].sum())
            totals += torch.tensor(
                [0.0, 0.0, float(targets.numel()), n_bytes], dtype=torch.float64, device=device
            )
            totals[0] += ce
            totals[1] += agree
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    nll, agree, n, n_bytes = totals.tolist()
    mean = nll / max(n, 1.0)
    out: dict[str, Any] = {
        "loss": mean,
        "ppl": safe_perplexity(mean),
        "tokens": int(n),
        "method": method_name(window, stride),
        "window": window,
        "stride": stride or window,
    }
    if nbytes is not None:
        out.update(bytes=int(n_bytes), bpb=nll / max(n_bytes, 1.0) / math.log(2))
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
        s = hidden_and_head(model, unwrapped, batch["input_ids"], batch["attention_mask"])
        t = hidden_and_head(teacher, teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])
        anchor = batch["anchor"]
        # as in training, a position whose next token is the packing EOS is not scored (the block's last
        # position predicts the next block's first token: kept)
        ok = anchor >= 0
        ok[:, :-1] &= batch["labels"][:, 1:] != IGNORE_INDEX
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
        totals[2] += ok.numel() - int((batch["labels"][:, 1:] == IGNORE_INDEX).sum())
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    agree, anchored, positions, mass = totals.tolist()
    return {
        "agreement": agree / max(anchored, 1.0),
        "anchored": anchored / max(positions, 1.0),
        "teacher_mass_mapped": mass / max(anchored, 1.0),
    }
