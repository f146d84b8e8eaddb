"""Several teacher distributions per position, combined into one (Knowledge Augmentation, Kim, Chu & Yang
2025, arXiv 2502.12947: M teacher forwards with re-drawn experts, the KD term averaged over them).

For forward KL the mean of the M terms differs from one term against the *mixture* of the M
distributions only by a constant (the mean teacher entropy minus the mixture's), so both give the student
the same gradient; :func:`mixture_logits` builds that mixture chunk by chunk. (For reverse KL the
normalised geometric mean plays this role, and its logits are the mean of the M logits: a mean of hidden
states before a linear head.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mixture_logits(logits: Tensor, temperature: float) -> Tensor:
    """``[..., M, V]`` logits of M teacher samples -> ``[..., V]`` logits whose tempered softmax is the equal
    mixture of the samples' tempered softmaxes: ``T·(logsumexp_m log_softmax(z_m / T) − log M)``.

    Dividing the result by ``T`` again (as every divergence does) gives the mixture's log-probabilities,
    already normalised.
    """
    m = logits.shape[-2]
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return (torch.logsumexp(logprobs, dim=-2) - math.log(m)) * temperature
