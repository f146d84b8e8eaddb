"""The teacher cache's storage format (bit-packed ids, shard encode/decode) and the losses that read a stored
signal across vocabularies, against plain references: the online projection of the full distribution
(k = V must give it exactly) and, for the sampled mode, the exact KL (unbiasedness)."""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from sakd.losses import KDSpec, SparseTeacher, kd_per_position, sample_teacher, topk_teacher
from sakd.losses.sparse_projection import one_to_one_as_many
from sakd.teacher.cache.bitpack import bits_for, pack_bits, packed_size, unpack_bits
from sakd.teacher.cache.lookup import stored_sparse
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.cache.shardfile import BlockSignal, decode_block, encode_shard


def test_bits_for_known_vocabularies():
    assert bits_for(151_936) == 18 and bits_for(151_646) == 18  # Qwen: does not fit 16 bits
    assert bits_for(49_152) == 16 and bits_for(65_536) == 16 and bits_for(65_537) == 17
    assert bits_for(2) == 1 and bits_for(1) == 1
    assert packed_size(8, 18) == 18  # 2.25 bytes per id


@pytest.mark.parametrize("bits", [1, 5, 8, 13, 16, 17, 18, 24, 31, 33])
def test_bitpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (1001,), generator=g)
    values[:2] = torch.tensor([0, 2**bits - 1])
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(1001, bits)
    assert torch.equal(unpack_bits(packed, bits, 1001), values)


def test_bitpack_refuses_ids_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\*\\*4"):
        pack_bits(torch.tensor([16]), 4)


def _spec(mode: str, **kw) -> SignalSpec:
    base = dict(
        mode=mode,
        top_k=5 if mode != "sampled" else None,
        num_samples=6 if mode == "sampled" else None,
        temperature=2.0,
        values_dtype="float16",
        vocab_size=151_936,
        index_bits=18,
        block_size=7,
        router_shape=[3, 4],
        seed=0 if mode == "sampled" else None,
    )
    return SignalSpec(**{**base, **kw})


def _block(spec: SignalSpec, index: int, g: torch.Generator) -> BlockSignal:
    n, v = spec.block_size, spec.vocab_size
    logits = torch.randn(n, 40, generator=g) * 3
    ids_map = torch.randperm(v, generator=g)[:40]  # 40 real ids anywhere in the big vocabulary
    if spec.mode == "sampled":
        s = sample_teacher(logits, spec.num_samples, temperature=spec.temperature, generator=g)
    else:
        s = topk_teacher(logits, spec.top_k, temperature=spec.temperature)
    ends = torch.cumsum(torch.randint(0, 9, (n,), generator=g), 0) + 1000 * index
    return BlockSignal(
        index=index,
        token_ids=torch.randint(0, v, (n,), generator=g),
        char_base=1000 * index,
        char_end=ends,
        follows_previous=index % 2 == 1,
        next_logprob=-torch.rand(n, generator=g),
        indices=ids_map[s.indices],
        logprobs=s.logprobs,
        counts=s.counts,
        tail=s.tail_logprob if spec.mode == "topk_tail" else None,
        router=torch.softmax(torch.randn(n, 3, 4, generator=g), -1),
    )


@pytest.mark.parametrize("values_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["topk", "topk_tail", "sampled"])
def test_shard_round_trip(mode, values_dtype, tmp_path):
    """write -> read gives the written tensors (values at the storage dtype's precision)."""
    spec = _spec(mode, values_dtype=values_dtype)
    low = {"float16": torch.float16, "bfloat16": torch.bfloat16}[values_dtype]
    g = torch.Generator().manual_seed(0)
    blocks = [_block(spec, i, g) for i in range(3)]
    tensors, meta = encode_shard(blocks, spec)
    path = tmp_path / "s.safetensors"
    path.write_bytes(safetensors.torch.save(tensors, metadata=meta))
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["sakd"])["mode"] == mode
        for j, want in enumerate(blocks):
            got = decode_block(f, j, spec)
            assert got.index == want.index and got.char_base == want.char_base
            assert got.follows_previous == want.follows_previous
            assert torch.equal(got.token_ids, want.token_ids) and torch.equal(got.char_end, want.char_end)
            assert torch.equal(got.next_logprob, want.next_logprob.to(low).float())
            assert torch.equal(got.router, want.router.to(low).float())
            if mode == "sampled":  # stored once per distinct id, count-0 padding dropped and restored
                keep = want.counts > 0
                for r in range(spec.block_size):
                    k = int(keep[r].sum())
                    assert torch.equal(got.indices[r, :k], want.indices[r][keep[r]])
                    assert torch.equal(got.counts[r, :k], want.counts[r][keep[r]])
                    assert torch.equal(got.logprobs[r, :k], want.logprobs[r][keep[r]].to(low).float())
                    assert (got.counts[r, k:] == 0).all()
            else:
                assert torch.equal(got.indices, want.indices)
                assert torch.equal(got.logprobs, want.logprobs.to(low).float())
                if mode == "topk_tail":
                    assert torch.equal(got.tail, want.tail.float())


def test_shard_bytes_are_a_function_of_the_content():
    spec = _spec("topk_tail")
    blocks = [_block(spec, i, torch.Generator().manual_seed(i)) for i in range(2)]
    first = safetensors.torch.save(*encode_shard(blocks, spec))
    assert all(safetensors.torch.save(*encode_shard(blocks, spec)) == first for _ in range(5))


def test_truncating_a_stored_top_k_keeps_the_exact_tail():
    logits = torch.randn(4, 30, dtype=torch.float64)
    full = topk_teacher(logits, 10, temperature=1.5)
    fields = {"indices": full.indices, "logprobs": full.logprobs, "counts": None, "tail": full.tail_logprob}
    cut = stored_sparse(fields, 1.5, 4)
    ref = topk_teacher(logits, 4, temperature=1.5)
    assert torch.equal(cut.indices, ref.indices)
    torch.testing.assert_close(cut.tail_logprob, ref.tail_logprob)


# ------------------------------------------------------------------- a stored signal across vocabularies

VS, VT = 20, 30


def _pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(6, VS, dtype=torch.float64, generator=g)
    teacher = torch.randn(6, VT, dtype=torch.float64, generator=g) * 2
    t2s = torch.randint(-1, VS, (VT,), generator=g)
    t2s[:3] = -1  # teacher ids no student token begins
    t2s[3:6] = 5  # several teacher ids onto one student id
    return student, teacher, t2s


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("sparse", ["topk_tail", "subset"])
def test_stored_teacher_with_every_id_equals_the_online_projection(kind, sparse):
    student, teacher, t2s = _pair()
    for temperature in (1.0, 2.0):
        online = kd_per_position(
            student, teacher, KDSpec(kind=kind, temperature=temperature), teacher_to_student=t2s
        )
        stored = topk_teacher(teacher, VT, temperature=temperature)
        spec = KDSpec(kind=kind, temperature=temperature, sparse=sparse)
        got = kd_per_position(student, stored, spec, teacher_to_student=t2s)
        torch.testing.assert_close(got, online, rtol=1e-10, atol=1e-12)


def test_stored_teacher_chain_rule_equals_the_online_projection():
    student, teacher, t2s = _pair(1)
    targets = torch.tensor([0, 5, 7, 19, 2, 3])
    chain = torch.tensor([float("nan"), -1.5, -0.2, -3.0, float("nan"), -0.7], dtype=torch.float64)
    online = kd_per_position(
        student, teacher, KDSpec(), teacher_to_student=t2s, targets=targets, target_logprob=chain
    )
    got = kd_per_position(
        student,
        topk_teacher(teacher, VT),
        KDSpec(sparse="topk_tail"),
        teacher_to_student=t2s,
        targets=targets,
        target_logprob=chain,
    )
    torch.testing.assert_close(got, online, rtol=1e-10, atol=1e-12)


def test_stored_teacher_with_a_one_to_one_map_equals_the_shared_support_projection():
    student, teacher, _ = _pair(2)
    vocab_map = torch.full((VS,), -1)
    vocab_map[:15] = torch.randperm(VT)[:15]
    online = kd_per_position(student, teacher, KDSpec(), vocab_map=vocab_map)
    got = kd_per_position(student, topk_teacher(teacher, VT), KDSpec(sparse="topk_tail"), vocab_map=vocab_map)
    torch.testing.assert_close(got, online, rtol=1e-10, atol=1e-12)
    t2s = one_to_one_as_many(vocab_map, VT)
    assert torch.equal(t2s[vocab_map[:15]], torch.arange(15)) and int((t2s >= 0).sum()) == 15


def test_a_smaller_stored_k_gives_a_finite_loss_and_gradient():
    student, teacher, t2s = _pair(3)
    student.requires_grad_(True)
    loss = kd_per_position(
        student, topk_teacher(teacher, 4), KDSpec(sparse="topk_tail"), teacher_to_student=t2s
    )
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all() and (loss >= -1e-12).all()


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def test_sampled_estimate_is_unbiased_same_vocabulary():
    """The mean over independent draws of the stored sampled estimate is the exact KL (within 4 SE)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 50, dtype=torch.float64, generator=g)
    teacher = torch.randn(3, 50, dtype=torch.float64, generator=g) * 2
    exact = kd_per_position(student, teacher, KDSpec(temperature=2.0))
    spec = KDSpec(temperature=2.0, sparse="sampled")
    draws = torch.stack(
        [
            kd_per_position(student, sample_teacher(teacher, 8, temperature=2.0, generator=g), spec)
            for _ in range(3000)
        ]
    )
    for pos in range(3):
        mean, se = _mean_and_se(draws[:, pos])
        assert abs(mean - float(exact[pos])) < 4 * se, (pos, mean, float(exact[pos]), se)


def test_sampled_gradient_is_unbiased_across_vocabularies():
    """Across vocabularies the sampled draws are draws of the projected distribution: the mean gradient
    (along a fixed random direction) is the online projected KL's gradient."""
    student, teacher, t2s = _pair(4)
    student.requires_grad_(True)
    exact = kd_per_position(student, teacher, KDSpec(), teacher_to_student=t2s).sum()
    (g_exact,) = torch.autograd.grad(exact, student)
    direction = torch.randn(student.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(1)
    values = []
    for _ in range(1500):
        loss = kd_per_position(
            student, sample_teacher(teacher, 8, generator=g), KDSpec(sparse="sampled"), teacher_to_student=t2s
        ).sum()
        (grad,) = torch.autograd.grad(loss, student)
        values.append(float((grad * direction).sum()))
    mean, se = _mean_and_se(torch.tensor(values))
    assert abs(mean - float((g_exact * direction).sum())) < 4 * se


def test_stored_signal_at_another_temperature_is_refused():
    student, teacher, t2s = _pair()
    stored = topk_teacher(teacher, 5, temperature=2.0)
    with pytest.raises(ValueError, match="own temperature"):
        kd_per_position(student, stored, KDSpec(sparse="topk_tail", temperature=1.0), teacher_to_student=t2s)
    assert isinstance(stored, SparseTeacher)
