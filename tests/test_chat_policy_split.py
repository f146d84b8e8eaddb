"""Chat policies (data.format=chat with distillation.policy on / mixed): the same update however a step is
split (1 micro-batch of 8 vs 4 of 2) and exact resume, as tests/test_policy.py checks for text."""

from __future__ import annotations

import json
import shutil

import pytest
import test_chat_policy as chat  # tests/ is on sys.path (pytest rootdir-less import)
import torch
from safetensors.torch import load_file

from sakd.config import load_config
from sakd.policy import is_policy_step
from sakd.training.trainer import Distiller

STEPS = 3
CONVERSATIONS, _recipe = chat.CONVERSATIONS, chat._recipe
student_tok, teacher_toks = chat.student_tok, chat.teacher_toks  # the fixtures, shared


def _chat_recipe(tiny_run_config, tmp_path, student_tok, teacher_tok, policy):
    gen = {"fraction": 0.5, "eval_prompts": 0} if policy == "mixed" else {"eval_prompts": 0}
    raw = _recipe(tiny_run_config, tmp_path, student_tok, teacher_tok, policy, temperature=1.5, **gen)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 24))
    raw["optimization"]["max_grad_norm"] = 1e9
    raw["training"].update(max_steps=STEPS)
    return raw


def _steps(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _run(make_distiller, raw, out, micro, accum):
    make_distiller(raw, output_dir=str(out), batch_size=micro, gradient_accumulation_steps=accum).train()
    return _steps(out), load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("policy", ["on", "mixed"])
@pytest.mark.parametrize("teacher", ["same", "other"])
def test_chat_policy_accumulation_split_gives_the_same_update(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path, policy, teacher
):
    t_tok = None if teacher == "same" else teacher_toks[teacher]
    raw = _chat_recipe(tiny_run_config, tmp_path, student_tok, t_tok, policy)
    (m1, w1), (m2, w2) = (
        _run(make_distiller, raw, tmp_path / f"b{micro}", micro, accum) for micro, accum in ((8, 1), (2, 4))
    )
    kinds = [int(is_policy_step(policy, 0.5, 0, s)) for s in range(STEPS)]
    assert [m["policy_step"] for m in m1] == [m["policy_step"] for m in m2] == kinds
    if policy == "mixed":
        assert 0 < sum(kinds) < STEPS
    for a, b in zip(m1, m2, strict=True):
        assert a.get("gen_tokens") == b.get("gen_tokens") and a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher", ["same", "other"])
def test_chat_policy_resumes_exactly(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path, teacher
):
    """mixed over conversations (both kinds of step): 2 steps + resume + 2 steps == 4 steps, bit for bit --
    weights, logged losses and the end-of-run evaluation of the student's answers; a second run from
    scratch writes the same answers."""
    t_tok = None if teacher == "same" else teacher_toks[teacher]
    raw = _recipe(
        tiny_run_config,
        tmp_path,
        student_tok,
        t_tok,
        "mixed",
        fraction=0.5,
        temperature=1.2,
        top_p=0.95,
        eval_prompts=3,
    )
    raw["training"].update(
        max_steps=4, save_every=2, keep_last_n=5, batch_size=2, gradient_accumulation_steps=2
    )
    kinds = [int(is_policy_step("mixed", 0.5, 0, s)) for s in range(4)]
    assert 0 < sum(kinds) < 4
    full, again, resumed = (tmp_path / name for name in ("full", "again", "resumed"))
    for out in (full, again):
        make_distiller(raw, output_dir=str(out)).train()
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    d = Distiller(load_config(raw)[0], resume="auto")
    assert d.state.step == 2
    d.train()
    ref = load_file(str(full / "final" / "model.safetensors"))
    for other in (again, resumed):
        got = load_file(str(other / "final" / "model.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), other.name
    steps = {r.name: _steps(r) for r in (full, resumed)}
    assert [m["policy_step"] for m in steps["full"]] == kinds
    assert [m["loss"] for m in steps["full"]] == [m["loss"] for m in steps["resumed"]]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (full, resumed)]
    assert summaries[0]["student_continuations"] == summaries[1]["student_continuations"]
    assert summaries[0]["generated_tokens"] == summaries[1]["generated_tokens"] > 0


@pytest.mark.multiprocess
def test_chat_on_policy_two_cpu_ranks_match_one_process(
    tiny_run_config, make_distiller, student_tok, teacher_toks, tmp_path
):
    """DDP over 2 CPU ranks of 4 conversations each == 1 process accumulating 2 micro-batches of 4, across
    tokenizers and templates: the same answers written (a prompt's sample depends on its seed, not on the
    rank), the same token counts and losses step by step, the same weights."""
    from test_distributed import _launch

    raw = _chat_recipe(tiny_run_config, tmp_path, student_tok, teacher_toks["other"], "on")
    raw["training"].update(batch_size=4, max_steps=2)
    single, ranked = tmp_path / "single", tmp_path / "ranks"
    m1, w1 = _run(make_distiller, raw, single, 4, 2)
    raw["training"]["output_dir"] = str(ranked / "run")
    ranks = _launch(raw, ranked)
    assert [(r["world"], r["accelerate_world"]) for r in ranks] == [(2, 2), (2, 2)]
    m2 = _steps(ranked / "run")
    assert [m["policy_step"] for m in m2] == [1, 1]
    for key in ("gen_tokens", "tokens"):
        assert [m[key] for m in m1] == [m[key] for m in m2], key
    assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-5)
    w2 = load_file(str(ranked / "run" / "final" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
