"""Parts that compose: combinations that used to be refused (curriculum x cache, token router x cache with
the cache's stored router probabilities, token router / curriculum x on-policy) and every pair of the
compatibility table that a recipe turns on (:func:`sakd.commands.compat_table.compatibility`), each trained
for 2 steps on tiny models: finite losses, the metrics its parts log, and exact resume for a few of them;
recipes of many parts at once on 2 ranks (ZeRO-2 with stages, ZeRO-3) against one process; and what a term
needs from the teacher signal refused in one line when the signal lacks it."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sakd.cli import main
from sakd.commands.compat_table import MANY_RECIPES, PARTS, compatibility
from sakd.config import load_config
from sakd.errors import ConfigError
from sakd.objective.router import token_signals
from sakd.objective.terms import Needs
from sakd.teacher.cache.manifest import SignalSpec
from sakd.teacher.capabilities import Capabilities, live_capabilities
from sakd.teacher.signal import stored_capabilities
from sakd.training.student_aware import detached_student
from sakd.training.trainer import Distiller

pytestmark = pytest.mark.integration

BLOCKS = 32
CURRICULUM = {"phases": True, "balance": True, "structure_start": 0.0, "all_start": 0.5}
ROUTER = {"enabled": True, "sharpen_start": 0.0, "sharpen_end": 0.5}
ON_POLICY = {"prompt_tokens": 8, "max_new_tokens": 6, "eval_prompts": 0}


@pytest.fixture(scope="module")
def base(tiny_run_config_module, tmp_path_factory) -> dict:
    raw = copy.deepcopy(tiny_run_config_module)
    raw["data"]["max_train_blocks"] = BLOCKS
    raw["data"]["max_eval_blocks"] = 2
    raw["training"].update(max_steps=2, output_dir=str(tmp_path_factory.mktemp("runs") / "run"))
    return raw


@pytest.fixture(scope="module")
def caches(base, tmp_path_factory) -> dict[str, str]:
    """Three caches of the tiny MoE teacher: top-k without and with its router probabilities, and sampled
    (the default mode, whose per-position KD estimate is signed) with them."""
    out = {}
    for name, router, mode in (
        ("plain", False, "topk_tail"),
        ("router", True, "topk_tail"),
        ("sampled", True, "sampled"),
    ):
        tmp = tmp_path_factory.mktemp(f"cache-{name}")
        raw = copy.deepcopy(base)
        raw["distillation"]["cache"] = {
            "mode": mode,
            "blocks_per_shard": 16,
            "batch_size": 4,
            "top_k": 16,
            "router": router,
        }
        (tmp / "recipe.json").write_text(json.dumps(raw))
        assert main(["cache-teacher", "--config", str(tmp / "recipe.json"), "--output", str(tmp / "c")]) == 0
        out[name] = str(tmp / "c")
    return out


def _with(raw: dict, **distillation) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in distillation.items():
        raw["distillation"][key] = value
    return raw


def _train(raw: dict, out: Path) -> list[dict]:
    raw = copy.deepcopy(raw)
    raw["training"]["output_dir"] = str(out)
    cfg, _ = load_config(raw)
    Distiller(cfg, resume="none", overwrite=True).train()
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(records: list[dict]) -> list[dict]:
    return [r for r in records if "loss" in r]


CASES = {
    # name: (distillation section changes, cache or None, metric keys every step logs)
    "cache x curriculum": ({"curriculum": CURRICULUM}, "plain", {"kd", "mult_kd", "mult_ce"}),
    "cache x token router (stored router probabilities)": (
        {"router": ROUTER},
        "router",
        {"kd", "router_w_mean", "router_w_share"},
    ),
    "cache x token router (no router probabilities)": ({"router": ROUTER}, "plain", {"kd", "router_w_mean"}),
    "sampled cache x token router x curriculum": (
        {"router": ROUTER, "curriculum": CURRICULUM},
        "sampled",
        {"kd", "router_w_mean", "router_w_share", "mult_kd"},
    ),
    "on-policy x token router": (
        {"policy": "on", "generation": ON_POLICY, "router": ROUTER},
        None,
        {"kd", "router_w_mean", "router_w_share", "policy_step"},
    ),
    "on-policy x curriculum": (
        {"policy": "on", "generation": ON_POLICY, "curriculum": CURRICULUM, "feature": {"weight": 0.5}},
        None,
        {"kd", "feature", "mult_feature", "policy_step"},
    ),
    "sequence-level x token router": (
        {"policy": "sequence", "generation": {**ON_POLICY, "sequence_loss": "kd"}, "router": ROUTER},
        None,
        {"kd", "router_w_mean", "router_w_share", "policy_step"},
    ),
    "KA x curriculum x feature": (
        {"moe": {"augment_samples": 2}, "curriculum": CURRICULUM, "feature": {"weight": 0.5}},
        None,
        {"kd", "feature", "ka_changed_share", "mult_feature"},
    ),
    "SAR x token router": (
        {"moe": {"student_aware_router": True}, "router": ROUTER},
        None,
        {"kd", "sar_kd", "router_w_mean"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_combination_trains_and_logs_its_parts(name, base, caches, tmp_path):
    change, cache, keys = CASES[name]
    raw = _with(base, **change)
    if cache is not None:
        raw["distillation"]["teacher_cache"] = caches[cache]
    steps = _steps(_train(raw, tmp_path / "run"))
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["loss"]) and keys <= set(record), (name, sorted(record))
    if cache == "plain":  # a cache without router probabilities: the expert signal is off
        assert all("router_w_share" not in r for r in steps)


def test_the_token_router_reads_the_caches_router_probabilities(base, caches, tmp_path):
    """The expert signal from a cache that stores the router's probabilities is the live teacher's routing
    at the same positions (stored in the cache's value dtype)."""
    runs = {}
    for name, cache in (("live", None), ("cached", caches["router"])):
        raw = _with(base, router=ROUTER, teacher_cache=cache)
        raw["training"]["output_dir"] = str(tmp_path / name)
        cfg, _ = load_config(raw)
        runs[name] = Distiller(cfg, resume="none", overwrite=True)
    signals = []
    for d in runs.values():
        mb = d._micro_batches()[0]
        rows = d.objective.kd_rows(
            detached_student(d.student, mb), d.teacher_signal(mb), mb["labels"][:, 1:].reshape(-1), mb
        )
        router = d.teacher_signal(mb).router if d.teacher_signal.capabilities.live else None
        signals.append(token_signals(rows, d.objective.spec.kd, router, 64))
    live, cached = signals
    assert cached.experts is not None and len(cached.experts) == len(live.experts) > 0
    for a, b in zip(live.experts, cached.experts, strict=True):
        torch.testing.assert_close(b, a, atol=2e-3, rtol=0)


RESUMED = {
    "cache x token router x curriculum": (
        {"router": ROUTER, "curriculum": CURRICULUM},
        "router",
    ),
    "on-policy x token router x curriculum": (
        {
            "policy": "mixed",
            "generation": {**ON_POLICY, "fraction": 0.5},
            "router": ROUTER,
            "curriculum": CURRICULUM,
        },
        None,
    ),
}


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_combination_resumes_exactly(name, base, caches, tmp_path):
    change, cache = RESUMED[name]
    raw = _with(base, **change)
    raw["training"].update(max_steps=4, save_every=2, keep_last_n=3)
    if cache is not None:
        raw["distillation"]["teacher_cache"] = caches[cache]
    full = tmp_path / "full"
    reference = _steps(_train(raw, full))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for gone in ("checkpoints/step-00000004", "final"):
        shutil.rmtree(resumed / gone)
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    cfg, _ = load_config(raw)
    d = Distiller(cfg, resume="auto")
    assert d.state.step == 2
    d.train()
    again = _steps([json.loads(x) for x in (resumed / "metrics.jsonl").read_text().splitlines()])
    assert [r["loss"] for r in again] == [r["loss"] for r in reference]
    a, b = (load_file(str(r / "final" / "model.safetensors")) for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"policy": "on", "generation": ON_POLICY}, "cannot score"),
        ({"moe": {"student_aware_router": True}}, "trains the live teacher's router"),
        ({"moe": {"augment_samples": 2}}, "re-routes the live teacher's experts"),
        ({"feature": {"weight": 1.0}}, "needs the teacher's hidden states"),
    ],
)
def test_what_a_cache_cannot_give_is_refused_in_one_line(change, expected, base, caches, tmp_path):
    raw = _with(base, **change, teacher_cache=caches["plain"])
    raw["training"]["output_dir"] = str(tmp_path / "run")
    cfg, _ = load_config(raw)
    with pytest.raises(ConfigError, match=expected) as info:
        Distiller(cfg, resume="none", overwrite=True)
    assert "\n" not in str(info.value)


PART = {p.name: p for p in PARTS}
WALKED = [
    pair
    for pair, c in compatibility().items()
    if c.status == "works" and PART[pair[0]].recipe is not None and PART[pair[1]].recipe is not None
]


def _merge(raw: dict, fragment: dict) -> None:
    for key, value in fragment.items():
        if isinstance(value, dict):
            _merge(raw.setdefault(key, {}), value)
        else:
            raw[key] = value


@pytest.mark.parametrize("pair", WALKED, ids=[" x ".join(p) for p in WALKED])
def test_every_pair_of_the_table_trains(pair, base, caches, tmp_path):
    """The compatibility table's cells that work, as the parts declare how a recipe turns them on: 2 steps,
    finite losses, and the metrics both parts log."""
    raw = copy.deepcopy(base)
    for name in pair:
        _merge(raw, copy.deepcopy(PART[name].recipe))
    if "teacher_cache" in raw["distillation"]:
        raw["distillation"]["teacher_cache"] = caches["router"]
    steps = _steps(_train(raw, tmp_path / "run"))
    keys = {k for name in pair for k in PART[name].metrics}
    if any(
        PART[name].recipe["distillation"].get("policy") == "mixed"
        for name in pair
        if "distillation" in PART[name].recipe
    ):
        keys -= {"policy_step"}  # logged on every step, 0 or 1
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["loss"]) and keys <= set(record), (pair, sorted(record))


# ---- many parts at once on 2 ranks (ZeRO-2 with stages, ZeRO-3): one launch trains several recipes ----

ROOT = Path(__file__).parents[1]
WORKER = ROOT / "tests" / "workers" / "recipes_worker.py"
STAGES = [{"name": "a", "steps": 1}, {"name": "b", "steps": 1, "learning_rate": 5e-4, "warmup_steps": 0}]
ZERO = {"ZeRO-2": "zero2", "ZeRO-3": "zero3"}


def _many(base: dict, caches: dict, parts: tuple[str, ...], out: Path, zero: str | None) -> dict:
    """The recipe that turns ``parts`` on as they declare (:attr:`Part.recipe`); ZeRO-2's as 2 stages."""
    raw = copy.deepcopy(base)
    for name in parts:
        _merge(raw, copy.deepcopy(PART[name].recipe))
    if "teacher_cache" in raw["distillation"]:
        raw["distillation"]["teacher_cache"] = caches["router"]
    if zero == "ZeRO-2":  # stages run under ZeRO-2 (a new engine per stage), not yet under ZeRO-3
        raw["optimization"]["stages"] = STAGES
    raw["training"].update(output_dir=str(out), batch_size=2)
    if zero is not None:
        raw["training"]["deepspeed"] = str(ROOT / "ds_configs" / f"{ZERO[zero]}.json")
    return raw


@pytest.mark.multiprocess
def test_many_parts_at_once_on_two_ranks(base, caches, tmp_path):
    """Each recipe of :data:`~sakd.commands.compat_table.MANY_RECIPES` turns several parts on at once (every
    pair among them, and each with the ZeRO stage, is a cell of the table), trained 2 steps on 2 ranks, all
    recipes one after the other in one launch; under ZeRO-2 each runs as 2 stages of 1 step. Finite losses,
    the metrics of every part, and what one process gives when it accumulates the same global batch (2
    micro-batches of 2)."""
    recipes = {
        f"{ZERO[zero]}-{i}": (zero, parts)
        for zero, all_parts in MANY_RECIPES.items()
        for i, parts in enumerate(all_parts)
    }
    for name, (zero, parts) in recipes.items():
        raw = _many(base, caches, parts, tmp_path / name, zero)
        (tmp_path / f"{name}.json").write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(tmp_path), *recipes],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (zero, parts) in recipes.items():
        ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in (0, 1)]
        assert [(r["world"], r["zero_stage"]) for r in ranks] == [(2, int(zero[-1]))] * 2, (zero, parts)
        steps = _steps([json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
        assert [r["step"] for r in steps] == [1, 2], (zero, parts)
        keys = {k for p in parts for k in PART[p].metrics} - (
            {"policy_step"} if "policy mixed" in parts else set()
        )
        for record in steps:
            assert math.isfinite(record["loss"]) and keys <= set(record), (zero, parts, sorted(record))
        if zero == "ZeRO-2":
            assert [r["stage"] for r in steps] == [0, 1], parts
        single = _many(base, caches, parts, tmp_path / "single" / name, zero)
        del single["training"]["deepspeed"]
        single["training"]["gradient_accumulation_steps"] = 2
        reference = _steps(_train(single, tmp_path / "single" / name))
        for key in ("loss", "tokens", *sorted(k for k in keys if isinstance(steps[0][k], float))):
            got, ref = [r[key] for r in steps], [r[key] for r in reference]
            assert got == pytest.approx(ref, rel=1e-4, abs=1e-5), (zero, parts, key)


def test_every_cell_that_works_names_its_test():
    """The table has no cell left that is expected to work without a test that trains the pair."""
    untested = [pair for pair, c in compatibility().items() if c.status == "works" and not c.test]
    assert not untested


class _NeedsRouter:
    """A term that reads the teacher's router probabilities (none of the shipped terms does yet)."""

    name = "router_term"
    needs = Needs(router_probs=True)
    phase = "output"

    def weights(self, d):
        return {"router_term": 1.0}

    def build(self, d, ctx):
        return None


@pytest.mark.parametrize(
    "caps, component, expected",
    [
        (
            stored_capabilities(SignalSpec("topk", 16, None, 2.0, "float16", 384, 9, 32)),
            _NeedsRouter(),
            "distillation.router_term needs the teacher's router probabilities, which a teacher cache does not hold",
        ),
        (
            live_capabilities(moe=False),
            _NeedsRouter(),
            "distillation.router_term needs the teacher's router probabilities, which the live teacher does not",
        ),
        (
            Capabilities(False, False, False, None, False, False, sparse_modes=()),
            None,
            "distillation.kd needs the teacher's next-token distribution, which a teacher cache does not hold",
        ),
    ],
    ids=["cache without router", "dense teacher", "no distribution"],
)
def test_what_a_term_needs_from_the_signal_is_refused_in_one_line(caps, component, expected, monkeypatch):
    """check_composition reads every need a term declares (Needs.router_probs and Needs.distribution as
    well as hidden_states): a signal that lacks one is refused in one line."""
    from sakd.objective import terms
    from sakd.objective.compose import check_composition

    if component is not None:
        monkeypatch.setattr(terms, "COMPONENTS", (*terms.COMPONENTS, component))
    cfg, _ = load_config({"model": {"teacher": "tiny-moe", "student": "tiny-dense"}})
    with pytest.raises(ConfigError, match=re.escape(expected)) as info:
        check_composition(cfg, caps)
    assert "\n" not in str(info.value)
