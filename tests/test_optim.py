"""Parameter groups: regex LR multipliers (first match wins, 0 freezes), no decay on biases/norms."""

import copy

import pytest
import torch

from sakd.config import ConfigError, OptimizationConfig, load_config
from sakd.training.optim import build_optimizer, lr_multiplier, param_groups
from sakd.training.trainer import Distiller


def test_first_match_wins():
    rules = {r"layers\.0\.": 0.5, r"layers\.": 0.1, "embed": 0.0}
    assert lr_multiplier("model.layers.0.mlp.up_proj.weight", rules) == 0.5
    assert lr_multiplier("model.layers.1.mlp.up_proj.weight", rules) == 0.1
    assert lr_multiplier("model.embed_tokens.weight", rules) == 0.0
    assert lr_multiplier("model.norm.weight", rules) == 1.0


def test_groups_and_freezing():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    groups = param_groups(model, 0.1, 1e-3, {r"^0\.": 0.0, r"^2\.": 0.5})
    assert not model[0].weight.requires_grad and not model[0].bias.requires_grad  # frozen, not in any group
    by_names = {tuple(g["names"]): (g["lr"], g["weight_decay"]) for g in groups}
    assert by_names == {
        ("1.weight", "1.bias"): (1e-3, 0.0),  # norm: no decay
        ("2.weight",): (5e-4, 0.1),
        ("2.bias",): (5e-4, 0.0),
    }
    with pytest.raises(ValueError, match="freeze every student parameter"):
        build_optimizer(torch.nn.Linear(2, 2), OptimizationConfig(lr_multipliers={".": 0.0}))


@pytest.mark.parametrize(
    "rules, message",
    [({"(": 1.0}, "bad regex"), ({"x": -1}, "must be >= 0"), ({"x": "fast"}, "must be a number")],
)
def test_bad_rules(rules, message):
    with pytest.raises(ConfigError, match=message):
        load_config({"optimization": {"lr_multipliers": rules}})


@pytest.mark.integration
def test_frozen_embeddings_do_not_move(tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["optimization"]["lr_multipliers"] = {"embed_tokens": 0.0}
    raw["training"]["max_steps"] = 2
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="none", overwrite=True)
    student = d.hf_student
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    d.train()
    after = dict(student.named_parameters())
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(
        before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"]
    )


def test_adamw_is_the_fused_kernel_with_the_loop_update():
    """The default optimizer is PyTorch's fused AdamW (one kernel for all tensors): its update equals the
    per-tensor reference implementation's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    reference = copy.deepcopy(model)
    cfg = OptimizationConfig(learning_rate=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(
        [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in param_groups(reference, 0.1, 1e-2, {})],
        lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, foreach=False,
    )  # fmt: skip
    for _ in range(3):
        x = torch.randn(4, 7)
        for m, opt in ((model, fused), (reference, loop)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
