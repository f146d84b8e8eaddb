"""Closed-form gradients of the sparse KD modes (:mod:`sakd.losses.sparse`) and the per-block KD term of
the fused loss's chunk loop for every combination it computes without autograd.

``subset`` and ``topk_tail`` compare bucket distributions (:mod:`sakd.losses.bucket_grads`): the subset's
ids (renormalized there, nothing else kept), or the teacher's top-k ids plus a tail bucket. ``sampled``
estimates forward KL from sampled ids with counts c_i (n = Σc):
``kd = Σ_i (c_i/n)·(log p_i − log q_i)``, so ``∂kd/∂u_v = q_v·[n > 0] − Σ_{i: id_i = v} c_i/n``.

:func:`kd_block_for` picks the closed form of a chunk: dense on one vocabulary
(:func:`sakd.losses.logit_grads.dense_kd_block`), a sparse mode, a vocabulary bridge, or a ``subset`` /
``topk_tail`` sparse mode applied to the bridge's buckets (two bucketings chained).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bucket_grads import FLOOR, BridgeIndex, Buckets, bridge_buckets, bucket_kd_, logsumexp_
from .logit_grads import KDBlock, dense_kd_block, log_softmax_
from .sparse import SparseTeacher, check_stored_temperature, floored_tail
from .spec import KDSpec


@torch.no_grad()
def sparse_buckets(
    z: Tensor, teacher: Tensor | SparseTeacher, mode: str, top_k: int, temperature: float, scratch: Tensor
) -> tuple[Buckets, Tensor, Tensor, Tensor | None]:
    """The ``subset`` / ``topk_tail`` buckets of a block: ``(buckets, x, teacher_buckets, x_tail)``.

    ``z``: ``[b, V]`` student logits, divided by ``temperature`` in place; ``teacher``: ``[b, V]`` dense
    teacher logits (consumed) or the block's stored rows; ``scratch``: a ``[b, V]`` buffer."""
    k = min(top_k, z.shape[-1])
    if mode == "subset":
        if isinstance(teacher, SparseTeacher):
            ids, repeated = teacher.indices, None
            t = teacher.logprobs.to(z.dtype) * (teacher.temperature / temperature)
        else:  # the union of both top-k, each id once (as sparse._subset_logprobs)
            ids = torch.cat([teacher.topk(k, dim=-1).indices, z.topk(k, dim=-1).indices], -1).sort(-1).values
            repeated = torch.zeros_like(ids, dtype=torch.bool)
            repeated[:, 1:] = ids[:, 1:] == ids[:, :-1]
            t = teacher.div_(temperature).gather(-1, ids).masked_fill_(repeated, FLOOR)
        buckets = Buckets(ids, repeated=repeated)
        x, tail = buckets.logits(z.div_(temperature))
        return buckets, x, t, tail
    if isinstance(teacher, SparseTeacher):
        ids, values, t_tail = teacher.indices, teacher.logprobs.to(z.dtype), teacher.tail_logprob
    else:  # sparse.topk_teacher, in place
        logprobs = log_softmax_(teacher, temperature, scratch)
        values, ids = logprobs.topk(k, dim=-1)
        t_tail = logsumexp_(logprobs.scatter_(-1, ids, float("-inf")))
    if ids.shape[-1] < z.shape[-1]:  # as sparse._tail_logprobs: a tail with ids is never below the floor
        values, t_tail = floored_tail(values, t_tail)
    elif t_tail is None:  # k = V: an empty tail
        t_tail = torch.full_like(values[:, 0], FLOOR)
    buckets = Buckets(ids, tail_rest=True)
    x, tail = buckets.logits(z.div_(temperature))
    return buckets, x, torch.cat([values, t_tail.to(z.dtype).unsqueeze(-1)], -1), tail


@torch.no_grad()
def sampled_rows_and_grad_(z: Tensor, teacher: SparseTeacher, temperature: float, scratch: Tensor) -> Tensor:
    """Sampled KD per row (:func:`sakd.losses.sparse._sampled_kl`); overwrites ``z`` ``[b, V]`` with
    ∂kd/∂z. ``scratch``: a ``[b, V]`` buffer."""
    u = z.div_(temperature)
    lse = logsumexp_(scratch.copy_(u))
    counts = teacher.counts.to(u.dtype)
    total = counts.sum(-1)
    share = counts / total.clamp_min(1.0).unsqueeze(-1)
    log_q = u.gather(-1, teacher.indices) - lse.unsqueeze(-1)
    ratio = torch.where(counts > 0, teacher.logprobs.to(u.dtype) - log_q, 0.0)
    rows = (share * ratio).sum(-1)
    u.sub_(lse.unsqueeze(-1)).exp_().mul_((total > 0).to(u.dtype).unsqueeze(-1))
    u.scatter_add_(-1, teacher.indices, -share)
    return rows


def kd_block_for(
    spec: KDSpec,
    teacher: Tensor | SparseTeacher,
    *,
    bridge: BridgeIndex | None,
    targets: Tensor | None,
    chain: Tensor | None,
    scratch: Tensor,
) -> KDBlock:
    """The closed-form KD term of one chunk (see the module docstring).

    Args:
        spec: the KD term (its ``sparse`` mode decides the path; ``uld_weight`` must be 0).
        teacher: ``[c, Vt]`` dense teacher logits of the chunk (consumed block by block), or its stored
            or drawn :class:`SparseTeacher` rows.
        bridge: the vocabulary bridge's index tensors, or None on one vocabulary.
        targets, chain: ``[c]`` target ids and chain-rule log-probabilities (with a bridge), or None.
        scratch: a ``[block, max(Vs, Vt)]`` buffer.
    """
    mode, temperature = spec.sparse, spec.temperature
    if isinstance(teacher, SparseTeacher):
        check_stored_temperature(teacher, mode, temperature)
    if bridge is None and mode is None:
        return dense_kd_block(teacher, spec, scratch)
    # with a bridge, the sparse mode applies to the bridge's bucket log-probs, which are logits at T = 1
    sparse_spec = spec if bridge is None else KDSpec(spec.kind, 1.0, spec.beta, spec.skew, mode, spec.top_k)

    def kd_block(rows: slice, z: Tensor) -> Tensor:
        size = z.shape[0]
        block_teacher = teacher.rows(rows) if isinstance(teacher, SparseTeacher) else teacher[rows]
        if mode == "sampled":  # one vocabulary only (kd_block_for's caller falls back with a bridge)
            return sampled_rows_and_grad_(z, block_teacher, temperature, scratch[:size, : z.shape[-1]])
        if bridge is None:
            buckets, x, t, tail = sparse_buckets(
                z, block_teacher, mode, spec.top_k, temperature, scratch[:size, : z.shape[-1]]
            )
            kd = bucket_kd_(x, t, spec, buckets.special_columns(x.shape[-1]))
            buckets.backward_(x, z, tail)
            return kd
        u = z.div_(temperature)
        b1, x1, t1, tail1 = bridge_buckets(
            u, block_teacher.div_(temperature), bridge, _rows(targets, rows), _rows(chain, rows),
            scratch[:size, : block_teacher.shape[-1]],
        )  # fmt: skip
        if mode is None:
            kd = bucket_kd_(x1, t1, spec, b1.special_columns(x1.shape[-1]))
        else:
            t1 = t1.contiguous()
            b2, x2, t2, tail2 = sparse_buckets(
                x1, t1, mode, min(spec.top_k, x1.shape[-1]), 1.0, torch.empty_like(t1)
            )
            kd = bucket_kd_(x2, t2, sparse_spec, b2.special_columns(x2.shape[-1]))
            b2.backward_(x2, x1, tail2)
        b1.backward_(x1, u, tail1)
        return kd

    def kd_block_scaled(rows: slice, z: Tensor) -> Tensor:
        kd = kd_block(rows, z)
        z.div_(temperature)  # ∂/∂z = ∂/∂u / T
        return kd

    return kd_block_scaled


def _rows(x: Tensor | None, rows: slice) -> Tensor | None:
    return None if x is None else x[rows]
