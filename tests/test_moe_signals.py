"""MoE-aware teacher signals on a real transformers Qwen3-MoE model: routing overrides restore the teacher
exactly, Knowledge Augmentation (Kim, Chu & Yang 2025) draws as specified and reduces to plain KD, and its
forward-KL mixture has the gradient of the mean of the M KD terms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from sakd.errors import SetupError
from sakd.losses import Head, HeadInput, KDSpec, ObjectiveSpec, Targets, fused_distill
from sakd.losses.mixture import mixture_logits
from sakd.teacher.moe import RoutingSpec, block_generators, override_routing, routers


@pytest.fixture(scope="module")
def moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )
    return Qwen3MoeForCausalLM(cfg).eval()


def _ids(batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(1))


def test_topk_override_is_the_model_and_removal_restores_it(moe):
    x = _ids()
    hooks_before = [dict(r._forward_hooks) for r in routers(moe)]
    with torch.no_grad():
        plain = moe(x).logits
        with override_routing(moe, RoutingSpec("topk")):
            same = moe(x).logits
        with override_routing(moe, RoutingSpec("all")):
            other = moe(x).logits
        after = moe(x).logits
    assert torch.equal(plain, same) and torch.equal(plain, after)
    assert not torch.equal(plain, other)  # every expert, weighted by the full softmax: another model
    assert [dict(r._forward_hooks) for r in routers(moe)] == hooks_before


def test_all_experts_equals_the_model_with_top_k_set_to_every_expert(moe):
    x = _ids()
    with torch.no_grad(), override_routing(moe, RoutingSpec("all")):
        overridden = moe(x).logits
    wide = copy.deepcopy(moe)
    for r in routers(wide):
        r.top_k, r.norm_topk_prob = r.num_experts, False  # the router's own top-E: every expert, full softmax
    with torch.no_grad():
        torch.testing.assert_close(overridden, wide(x).logits, rtol=0, atol=1e-6)


def test_ka_without_sampling_and_the_model_k_is_the_model(moe):
    x = _ids()
    with torch.no_grad():
        plain = moe(x).logits
        with override_routing(moe, RoutingSpec("ka", k=2, sampling_prob=0.0)):
            assert torch.equal(moe(x).logits, plain)


def test_ka_coin_chooses_between_the_sampler_and_top_k(moe):
    """lambda = 1: every token takes the sampler's experts (here: a selector returning the two least
    likely ones); lambda = 0: the top k -- checked per token against the router's own probabilities."""
    x = _ids()

    def bottom(probs, k, generator):
        return torch.topk(-probs, k, dim=-1).indices

    for prob, pick in (
        (0.0, lambda p: torch.topk(p, 2, -1).indices),
        (1.0, lambda p: torch.topk(-p, 2, -1).indices),
    ):
        captured: list = []
        handle = routers(moe)[0].register_forward_hook(lambda m, a, out, seen=captured: seen.append(out))
        try:
            with (
                torch.no_grad(),
                override_routing(moe, RoutingSpec("ka", k=2, sampling_prob=prob, selector=bottom)),
            ):
                moe(x)
        finally:
            handle.remove()
        logits, scores, indices = captured[0]
        probs = torch.softmax(logits.float(), -1)
        assert torch.equal(indices, pick(probs))
        torch.testing.assert_close(
            scores, probs.gather(-1, indices) / probs.gather(-1, indices).sum(-1, keepdim=True)
        )


def test_ka_sampling_matches_the_router_distribution(moe):
    """Drawn without replacement from softmax(logits): the first of one drawn expert per token is distributed
    as the router's probabilities (a known answer, to sampling error)."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    router = routers(moe)[0]
    gens = [torch.Generator().manual_seed(3)]
    from sakd.teacher.moe import route

    _, idx = route(
        logits, router, RoutingSpec("ka", k=1, sampling_prob=1.0, generators=gens, rows_per_block=20000)
    )
    freq = torch.bincount(idx[:, 0], minlength=4).float() / idx.shape[0]
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), rtol=0, atol=0.015)


def test_ka_draws_of_a_block_do_not_depend_on_its_micro_batch(moe):
    """Each block draws from its own generator: the same block gives the same teacher output whether it
    shares its micro-batch with others or not (the same answer however a step is split)."""
    x = _ids(3, 10)

    def run(rows, ids):
        spec = RoutingSpec("ka", sampling_prob=0.5, generators=block_generators(7, 2, ids, 1, x.device))
        spec.rows_per_block = x.shape[1]
        with torch.no_grad(), override_routing(moe, spec):
            return moe(x[rows]).logits

    together = run(slice(0, 3), [10, 11, 12])
    alone = run(slice(1, 2), [11])
    assert torch.equal(together[1], alone[0])
    with torch.no_grad():
        assert not torch.equal(together, moe(x).logits)  # lambda = 0.5 did change some routing


@pytest.mark.parametrize("closed_form", [True, False])
def test_forward_kl_mixture_has_the_gradient_of_the_mean_of_the_m_kd_terms(closed_form):
    """KA's loss is the mean of M KD terms (paper Algorithm 1); for forward KL one KD term against the
    mixture of the M teacher distributions differs from it by a constant, so the gradients are equal."""
    torch.manual_seed(0)
    n, h, v, m, temperature = 12, 8, 20, 3, 2.0
    s_hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    s_head = torch.randn(v, h, dtype=torch.float64)
    t_hidden, t_head = torch.randn(n, m, h, dtype=torch.float64), torch.randn(v, h, dtype=torch.float64)
    spec = ObjectiveSpec(kd=KDSpec("fkl", temperature=temperature), alpha=1.0, chunk_size=5)
    targets = Targets() if closed_form else Targets(kd_mask=torch.ones(n, dtype=torch.bool))
    mixed = fused_distill(
        HeadInput(s_hidden, Head(s_head)), HeadInput(t_hidden, Head(t_head), mixture=True), spec, targets
    )
    (grad_mixed,) = torch.autograd.grad(mixed.loss, s_hidden)
    log_q = F.log_softmax(s_hidden @ s_head.T / temperature, -1)
    mean_kl = 0.0
    for i in range(m):
        log_p = F.log_softmax(t_hidden[:, i] @ t_head.T / temperature, -1)
        mean_kl = mean_kl + (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2 / m
    (grad_mean,) = torch.autograd.grad(mean_kl, s_hidden)
    torch.testing.assert_close(grad_mixed, grad_mean, rtol=1e-10, atol=1e-12)


def test_mixture_logits_are_the_mixture():
    z = torch.randn(4, 3, 7, dtype=torch.float64)
    mixed = mixture_logits(z, 1.5)
    torch.testing.assert_close(torch.softmax(mixed / 1.5, -1), torch.softmax(z / 1.5, -1).mean(1))


@pytest.mark.integration
def test_ka_with_one_sample_and_no_sampling_is_plain_kd(make_distiller, tiny_run_config):
    """M = 1, lambda = 0 and the model's own k: the KA path gives plain KD's update bit for bit."""
    results = []
    for moe_cfg in ({}, {"augment_samples": 1, "augment_sampling_prob": 0.0, "augment_experts": 2}):
        raw = copy.deepcopy(tiny_run_config)
        raw["distillation"]["moe"] = moe_cfg
        d = make_distiller(raw, max_steps=2)
        d.train()
        results.append({k: v.clone() for k, v in d.hf_student.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_ka_trains_and_changes_the_teacher_signal(make_distiller, tiny_run_config, kind):
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"]["kind"] = kind
    raw["distillation"]["moe"] = {"augment_samples": 2, "augment_sampling_prob": 0.5}
    d = make_distiller(raw, max_steps=2)
    metrics = d.train_step(d._micro_batches())
    assert torch.isfinite(torch.tensor(metrics["loss"])) and metrics["kd"] > 0


def test_a_dense_teacher_is_refused_in_one_line(make_distiller, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["teacher"] = "tiny-dense"
    raw["distillation"]["moe"] = {"augment_samples": 2}
    with pytest.raises(SetupError) as err:
        make_distiller(raw)
    msg = str(err.value)
    assert "Mixture-of-Experts teacher" in msg and "LlamaForCausalLM" in msg and len(msg.splitlines()) == 1


def test_ka_counts_the_decisions_that_left_the_top_k(moe):
    """The KA metric's counts: lambda = 1 with a sampler of the two least likely of 4 experts changes every
    decision; lambda = 0 none. Decisions = token rows x MoE layers."""
    x = _ids()

    def bottom(probs, k, generator):
        return torch.topk(-probs, k, dim=-1).indices

    layers = len(routers(moe))
    for prob, share in ((0.0, 0.0), (1.0, 1.0)):
        spec = RoutingSpec("ka", k=2, sampling_prob=prob, selector=bottom)
        with torch.no_grad(), override_routing(moe, spec):
            moe(x)
        assert spec.decisions == x.numel() * layers
        assert float(spec.changed) == share * spec.decisions


@pytest.mark.integration
def test_ka_announces_itself_and_logs_its_metric(make_distiller, tiny_run_config, capsys):
    shares = []
    for prob in (0.0, 0.5):
        raw = copy.deepcopy(tiny_run_config)
        raw["distillation"]["moe"] = {"augment_samples": 2, "augment_sampling_prob": prob}
        d = make_distiller(raw, max_steps=2)
        assert "student-aware: Knowledge Augmentation: 2 teacher forwards" in capsys.readouterr().out
        shares.append(d.train_step(d._micro_batches())["ka_changed_share"])
    # lambda = 0: KA takes the top k, nothing changes; lambda = 0.5: about half the tokens sample their
    # experts, and some of those samples differ from the top k
    assert shares[0] == 0.0 and 0.0 < shares[1] < 0.75
