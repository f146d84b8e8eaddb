"""The Student-Aware Router (Kim, Chu & Yang 2025): starts exactly at the teacher's own all-experts
routing, cannot collapse a gate (the bounded offset), sends its gradient only into the offsets (checked by
finite differences), trains only those (every teacher tensor bitwise unchanged), resumes exactly, is kept
in checkpoints apart from the student and never exported."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from sakd.config import MoEConfig
from sakd.losses import Head, HeadInput, VocabBridge
from sakd.teacher.moe import RoutingSpec, override_routing
from sakd.teacher.moe_router import (
    SAR_OPTIMIZER,
    SAR_WEIGHTS,
    StudentAwareRouter,
    router_kd_sum,
    router_terms,
)
from sakd.training.student_aware import SARHook


def _teacher(dtype: torch.dtype = torch.float32) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=64,
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
    cfg._experts_implementation = "eager"  # grouped_mm has no float64 kernel (the gradient check needs one)
    model = Qwen3MoeForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))


def test_zero_offsets_route_exactly_like_all_experts():
    teacher = _teacher()
    sar = StudentAwareRouter(teacher, MoEConfig(student_aware_router=True), torch.device("cpu"))
    with torch.no_grad():
        with override_routing(teacher, RoutingSpec("all")):
            plain = teacher(_ids()).logits
        with override_routing(teacher, sar.routing()):
            routed = teacher(_ids()).logits
    assert torch.equal(plain, routed)


@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_bounded_offsets_cannot_collapse_a_gate(rho):
    """Whatever the offsets: every gate >= exp(-2 rho) x its original, KL(original || learned) <= 2 rho."""
    teacher = _teacher()
    sar = StudentAwareRouter(
        teacher, MoEConfig(student_aware_router=True, router_max_logit_shift=rho), torch.device("cpu")
    )
    with torch.no_grad():
        for p in sar.offsets:
            p.normal_(0, 50.0)  # far beyond anything training would reach
        spec = sar.routing(record=True)
        with override_routing(teacher, spec):
            teacher(_ids())
    for original, routed in spec.recorded:
        g0, g = torch.softmax(original, -1), torch.softmax(routed, -1)
        assert torch.all(g >= g0 * torch.exp(torch.tensor(-2 * rho)) * (1 - 1e-5))
        kl = (g0 * (g0.log() - g.log())).sum(-1)
        assert float(kl.max()) <= 2 * rho + 1e-5
        assert float((g - g0).abs().max()) > 0.1  # the offsets did move the gates


def _router_loss(teacher, sar, student_hidden, student_head, ids):
    spec = sar.routing(record=True)
    with override_routing(teacher, spec):
        out = teacher(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1].reshape(-1, 32)
    valid = torch.ones(hidden.shape[0], dtype=torch.bool)
    kd = router_kd_sum(
        HeadInput(student_hidden, Head(student_head)),
        HeadInput(hidden, Head(teacher.lm_head.weight)),
        valid,
        2.0,
        VocabBridge(),
        chunk_size=5,
    )
    terms = router_terms(spec.recorded, torch.ones(ids.numel(), dtype=torch.bool))
    return kd + 0.3 * terms.balance + 0.2 * terms.anchor_sum


def test_router_gradient_reaches_only_the_offsets_and_matches_finite_differences():
    teacher = _teacher(torch.float64)
    sar = StudentAwareRouter(
        teacher, MoEConfig(student_aware_router=True, router_max_logit_shift=1.0), torch.device("cpu")
    )
    with torch.no_grad():
        for p in sar.offsets:
            p.normal_(0, 0.3)
    ids = _ids()
    torch.manual_seed(4)
    s_hidden, s_head = (
        torch.randn(ids.shape[0] * 8, 16, dtype=torch.float64),
        torch.randn(64, 16, dtype=torch.float64),
    )
    loss = _router_loss(teacher, sar, s_hidden, s_head, ids)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grad = sar.offsets[1].grad
    assert grad is not None and float(grad.abs().max()) > 0
    i, j, eps = 2, 5, 1e-3
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            sar.offsets[1][i, j] += sign * eps
            values.append(float(_router_loss(teacher, sar, s_hidden, s_head, ids)))
            sar.offsets[1][i, j] -= sign * eps
    numeric = (values[0] - values[1]) / (2 * eps)
    assert numeric == pytest.approx(float(grad[i, j]), rel=2e-3, abs=1e-6)


def _sar_recipe(tiny_run_config: dict) -> dict:
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["moe"] = {"student_aware_router": True, "router_lr": 1e-2, "router_anchor_coef": 0.1}
    return raw


@pytest.mark.integration
def test_sar_trains_only_the_router_and_is_kept_apart_from_the_student(
    make_distiller, tiny_run_config, tmp_path
):
    d = make_distiller(_sar_recipe(tiny_run_config), max_steps=3, save_every=3)
    teacher_before = {k: v.clone() for k, v in d.teacher.state_dict().items()}
    d.train()
    assert all(torch.equal(v, teacher_before[k]) for k, v in d.teacher.state_dict().items())
    assert all(float(p.abs().max()) > 0 for p in _sar(d).offsets)  # the router did learn
    ckpt = d.run_dir / "checkpoints" / "step-00000003"
    saved = load_file(str(ckpt / SAR_WEIGHTS))
    assert all(torch.equal(saved[f"offset.{i}"], p.detach()) for i, p in enumerate(_sar(d).offsets))
    assert (ckpt / SAR_OPTIMIZER).is_file()
    plain = make_distiller(tiny_run_config, max_steps=1, output_dir=str(tmp_path / "plain"))
    plain.train()
    exported = load_file(str(d.run_dir / "final" / "model.safetensors"))
    assert exported.keys() == load_file(str(tmp_path / "plain" / "final" / "model.safetensors")).keys()
    records = (d.run_dir / "metrics.jsonl").read_text()
    assert '"sar_drift"' in records and '"sar_drift_layers"' in records


@pytest.mark.integration
def test_sar_resume_is_exact(make_distiller, tiny_run_config, tmp_path):
    """2 steps + resume + 2 steps == 4 steps: student weights, router offsets and router optimizer, bit for bit."""
    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    raw = _sar_recipe(tiny_run_config)
    raw["training"].update(
        max_steps=4, save_every=2, keep_last_n=5, batch_size=2, gradient_accumulation_steps=2
    )
    full = tmp_path / "full"
    make_distiller(raw, output_dir=str(full)).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="auto")
    assert d.state.step == 2
    d.train()
    for name in ("model.safetensors", SAR_WEIGHTS):
        a, b = (load_file(str(r / "checkpoints" / "step-00000004" / name)) for r in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (
        torch.load(r / "checkpoints" / "step-00000004" / SAR_OPTIMIZER, weights_only=True)
        for r in (full, resumed)
    )
    assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"])


def _sar(d):
    """The run's Student-Aware Router (inside its per-step hook)."""
    return next(hook.sar for hook in d.aware.hooks if isinstance(hook, SARHook))
