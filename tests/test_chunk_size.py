"""``chunk_size: auto``: the rule (Liger's sizing on both heads, bounded), its use by the fused loss, the
config and the planner."""

import pytest
import torch

from sakd.config import ConfigError, load_config
from sakd.losses import auto_chunk_size, distill_loss, fused_linear_divergence, resolve_chunk_size
from sakd.losses.chunk_size import MIN_CHUNK_ROWS
from sakd.planner.estimate import Workload, loss_bytes
from sakd.planner.sizes import model_numbers

SMOL, QWEN = (49_152, 576), (151_936, 1024)


@pytest.mark.parametrize(
    ("n", "teacher", "want"),
    [
        (2048, (49_152, 1024), 128),  # Liger's size is 33 rows: the efficiency floor decides
        (2048, QWEN, 128),  # 17 rows by Liger's rule
        (16_384, QWEN, 256),  # N / ceil(201088 / 1600) = 131 -> the next power of two
        (65_536, (49_152, 1024), 2048),  # N / ceil(98304 / 1600) = 1058 -> 2048
        (100, QWEN, 100),  # never more than the positions there are
    ],
)
def test_auto_chunk_size_known_values(n, teacher, want):
    assert auto_chunk_size(n, SMOL[0], teacher[0], SMOL[1], teacher[1]) == want


def test_auto_chunk_logits_stay_near_the_hidden_input_size():
    """The property behind the rule: above the floor, a chunk's logits are 1-2x the hidden-state input
    (Liger's 'as large as' rounded up to a power of two), whatever the number of tokens."""
    for n in (2**k for k in range(15, 21)):
        rows = auto_chunk_size(n, SMOL[0], QWEN[0], SMOL[1], QWEN[1])
        ratio = rows * (SMOL[0] + QWEN[0]) / (n * (SMOL[1] + QWEN[1]))
        assert rows > MIN_CHUNK_ROWS and 1.0 <= ratio < 2.0, (n, rows, ratio)


def test_resolve_keeps_an_explicit_number():
    assert resolve_chunk_size(37, 10_000, (10, 10), (1, 1)) == 37
    assert resolve_chunk_size("auto", 10_000, (10, 10), (1, 1)) == auto_chunk_size(10_000, 10, 10, 1, 1)


def test_fused_loss_defaults_to_auto_and_equals_the_unfused_loss():
    gen = torch.Generator().manual_seed(0)
    n, h, v = 300, 8, 50  # auto: 128-row chunks, three of them
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden, t_weight = (
        torch.randn(n, h, generator=gen, dtype=torch.float64),
        torch.randn(v, h, generator=gen, dtype=torch.float64),
    )
    labels = torch.randint(0, v, (n,), generator=gen)
    auto = fused_linear_divergence(hidden, weight, t_hidden, t_weight, "fkl", labels=labels, alpha=0.5)
    fixed = fused_linear_divergence(
        hidden, weight, t_hidden, t_weight, "fkl", labels=labels, alpha=0.5, chunk_size=128
    )
    plain = distill_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels, alpha=0.5)
    assert auto.loss.item() == fixed.loss.item()
    torch.testing.assert_close(auto.loss, plain.loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_divergence(hidden, weight, t_hidden, t_weight, "fkl", chunk_size="big")


def test_config_key():
    assert load_config({})[0].distillation.loss.chunk_size == "auto"
    assert load_config({}, ["distillation.loss.chunk_size=256"])[0].distillation.loss.chunk_size == 256
    for bad in ("0", "big", "1.5"):
        with pytest.raises(ConfigError, match="chunk_size must be auto or an integer"):
            load_config({}, [f"distillation.loss.chunk_size={bad}"])


def test_planner_uses_the_same_rule():
    student, teacher = model_numbers("smollm-135m", 49_152), model_numbers("huihui-moe-1.2b", 151_646)
    tokens = 4 * 384
    auto = loss_bytes(student, teacher, tokens, Workload(seq_len=384, aligned=True), 2)
    rows = auto_chunk_size(tokens, student.vocab, teacher.vocab, student.hidden, teacher.hidden)
    fixed = loss_bytes(student, teacher, tokens, Workload(seq_len=384, chunk_size=rows, aligned=True), 2)
    assert auto == fixed
    old = loss_bytes(student, teacher, tokens, Workload(seq_len=384, chunk_size=1024, aligned=True), 2)
    assert auto[0] < old[0] / 6  # the recipe's former chunk of 1024 needed far more
