"""On-policy, mixed and sequence-level distillation (sakd/policy): seeded generation, prompt masking, the
on-policy loss against a full-logits reference, lambda = 0 == off-policy bit for bit, exact resume."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from sakd.config import ConfigError, load_config
from sakd.policy import Sampling, generate, is_policy_step, row_seed, score_continuations
from sakd.policy.batches import IGNORE_INDEX, collate, student_written
from sakd.policy.continuations import ContinuationSpec
from sakd.policy.rollout import ON_POLICY_TEMPERATURE
from sakd.policy.sampling import SeededGumbel, TemperatureLogitsWarper, TopPLogitsWarper
from sakd.training.trainer import Distiller


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


class _Tok:
    """The three things generation asks of a tokenizer."""

    eos_token_id, pad_token_id = 1, 0

    def __len__(self) -> int:
        return 60  # the head has 64 rows: ids 60..63 must never be written


def _policy_recipe(tiny_run_config: dict, policy: str = "on", **generation) -> dict:
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["policy"] = policy
    raw["distillation"]["generation"] = {"prompt_tokens": 8, "max_new_tokens": 10, **generation}
    return raw


# ---------------------------------------------------------------------------------------------- sampling


def test_a_prompts_sample_depends_on_its_seed_not_on_the_batch(tiny_lm):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    sampling = Sampling(max_new_tokens=12, temperature=1.3)
    seeds = [row_seed(0, 3, i, 1) for i in range(4)]
    together = generate(tiny_lm, prompts, sampling, seeds=seeds, tokenizer=_Tok())
    apart = generate(tiny_lm, prompts[2:], sampling, seeds=seeds[2:], tokenizer=_Tok())
    assert together[2:] == apart  # not how the step is split into micro-batches or ranks
    again = generate(tiny_lm, prompts, sampling, seeds=seeds, tokenizer=_Tok())
    assert again == together
    other = generate(tiny_lm, prompts, sampling, seeds=[s + 1 for s in seeds], tokenizer=_Tok())
    assert other != together
    assert all(t < 60 for row in together + other for t in row)  # never an id past the tokenizer
    for row in together:  # stops at EOS (kept), else max_new_tokens
        assert (row[-1] == 1 and 1 not in row[:-1]) or (len(row) == 12 and 1 not in row)


def test_greedy_is_transformers_greedy(tiny_lm):
    prompts = [[5, 6, 7], [8, 9, 10]]
    ours = generate(tiny_lm, prompts, Sampling(8, greedy=True), seeds=[0, 0], tokenizer=_Tok())
    logits_mask = torch.zeros(64)
    logits_mask[60:] = float("-inf")
    ref = []
    for p in prompts:  # an independent greedy loop over full logits
        ids = list(p)
        for _ in range(8):
            nxt = int((tiny_lm(torch.tensor([ids])).logits[0, -1] + logits_mask).argmax())
            ids.append(nxt)
            if nxt == 1:
                break
        ref.append(ids[len(p) :])
    assert ours == ref


def test_gumbel_max_samples_the_tempered_nucleus_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n, temperature, top_p = 6000, 0.8, 0.9
    scores = logits.expand(n, -1).clone()
    processors = LogitsProcessorList(
        [
            TemperatureLogitsWarper(temperature),
            TopPLogitsWarper(top_p),
            SeededGumbel([row_seed(7, i) for i in range(n)], torch.device("cpu")),
        ]
    )
    draws = processors(torch.zeros((n, 1), dtype=torch.long), scores).argmax(-1)
    p = torch.softmax(logits / temperature, -1)
    keep = torch.cumsum(p, 0) - p < top_p  # the nucleus: smallest prefix with mass >= top_p
    q = torch.where(keep, p, 0.0) / p[keep].sum()
    freq = torch.bincount(draws, minlength=6).double() / n
    assert torch.all(freq[~keep] == 0)
    sigma = torch.sqrt(q * (1 - q) / n)
    assert torch.all((freq - q).abs() <= 4 * sigma + 1e-12), (freq, q)


def test_mixed_draws_are_a_function_of_seed_and_step():
    draws = [is_policy_step("mixed", 0.5, 0, s) for s in range(400)]
    assert draws == [is_policy_step("mixed", 0.5, 0, s) for s in range(400)]
    assert 0.4 < sum(draws) / 400 < 0.6
    assert draws != [is_policy_step("mixed", 0.5, 1, s) for s in range(400)]
    assert not any(is_policy_step("mixed", 0.0, 0, s) for s in range(50))
    assert all(is_policy_step("mixed", 1.0, 0, s) and is_policy_step("on", 0.3, 0, s) for s in range(50))
    assert not any(is_policy_step("off", 1.0, 0, s) for s in range(50))


# ---------------------------------------------------------------------------------------- the batches


def test_prompt_tokens_and_padding_carry_no_loss():
    prompts, completions = [[5, 6, 7], [8, 9, 10]], [[11, 12, 1], [13, 14, 15, 16, 17]]
    rows = student_written(prompts, completions, None, None)
    mb = collate(rows, torch.tensor([4, 9]), pad_id=0)
    assert mb["input_ids"].tolist() == [[5, 6, 7, 11, 12, 1, 0, 0], [8, 9, 10, 13, 14, 15, 16, 17]]
    assert mb["attention_mask"].tolist() == [[1] * 6 + [0, 0], [1] * 8]
    n = IGNORE_INDEX
    assert mb["labels"].tolist() == [[n, n, n, 11, 12, 1, n, n], [n, n, n, 13, 14, 15, 16, 17]]
    # the objective sums over labels[:, 1:] != -100: the positions that predict a generated token
    predicting = (mb["labels"][:, 1:] != IGNORE_INDEX).nonzero().tolist()
    assert predicting == [[0, 2], [0, 3], [0, 4], [1, 2], [1, 3], [1, 4], [1, 5], [1, 6]]


def _reference_divergence(s_logits, t_logits, kind, beta, temperature=1.0):
    """Per-position divergence from full logits, written out (p = teacher, q = student): reverse KL, or the
    generalized JSD of GKD, JSD_beta = beta*KL(p||m) + (1-beta)*KL(q||m) with m = beta*p + (1-beta)*q, and
    TRL's endpoints beta = 0 -> KL(p||q), beta = 1 -> KL(q||p)."""
    p = torch.softmax(t_logits.double() / temperature, -1)
    q = torch.softmax(s_logits.double() / temperature, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return kl(q, p)
    if kind == "jsd" and beta == 0.0:
        return kl(p, q)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", ["rkl", "jsd"])
def test_on_policy_loss_equals_a_full_logits_reference(make_distiller, tiny_run_config, kind):
    """The on-policy objective on a hand-made rollout: the divergence at the positions that predict a
    generated token, nothing at the prompt or padding."""
    raw = _policy_recipe(tiny_run_config)
    raw["distillation"]["loss"].update(kind=kind, beta=0.3, temperature=2.0, alpha=0.5)
    d = make_distiller(raw)
    vocab = len(d.tokenizer)
    eos = d.tokenizer.eos_token_id
    # a hand-made rollout: two prompts, one continuation ending in EOS, one cut by the length limit
    prompts = [[40, 41, 42, 43], [50, 51, 52]]
    completions = [[60, 61, eos], [70, 71, 72, 73, 74]]
    mb = collate(student_written(prompts, completions, None, None), torch.tensor([0, 1]), pad_id=0)
    objective = d.policy.objective
    assert objective.cfg.alpha == 1.0  # no CE on the student's own tokens
    out = d._student_loss(d.student, mb, d.teacher_signal(mb), ON_POLICY_TEMPERATURE, objective=objective)
    with torch.no_grad():
        s_logits = d.hf_student(mb["input_ids"], attention_mask=mb["attention_mask"]).logits[..., :vocab]
        t_logits = d.teacher(mb["input_ids"], attention_mask=mb["attention_mask"]).logits[..., :vocab]
    per_position = _reference_divergence(s_logits, t_logits, kind, 0.3)
    where = torch.zeros_like(per_position, dtype=torch.bool)
    where[0, 3:6] = True  # row 0: 4 prompt tokens; 60, 61, EOS at 4..6 are predicted from positions 3..5
    where[1, 2:7] = True  # row 1: 3 prompt tokens; 70..74 at 3..7 are predicted from positions 2..6
    reference = per_position[where].sum()
    assert out.num_tokens == 8
    assert float(out.loss_sum.detach()) == pytest.approx(float(reference), rel=1e-4)  # float32 vs float64


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_an_on_policy_step_is_gkds_jsd_at_temperature_one(make_distiller, tiny_run_config, beta):
    """A whole on-policy train step (loss temperature 2 with T², generation temperature 1.5): its loss is
    the generalized JSD at T = 1, without a T² factor, averaged over the student's sampled completion tokens
    (GKD; TRL's GKDTrainer scores at T = 1 too), computed here from the full logits of the student before
    the update and of the teacher. (T²·JSD at the loss temperature, what the step used to compute, is checked
    to differ from it by far more than the tolerance: T² makes the two agree to first order.)"""
    loss_t = 2.0
    raw = _policy_recipe(tiny_run_config, "on", temperature=1.5, eval_prompts=0)
    raw["distillation"]["loss"].update(kind="jsd", beta=beta, temperature=loss_t, scale_by_t2=True)
    d = make_distiller(raw, batch_size=2, gradient_accumulation_steps=2)
    with torch.no_grad():  # a peaked teacher, far from the student: the temperature's effect is not small
        d.teacher.get_output_embeddings().weight.mul_(6.0)
    blocks = d._micro_batches()
    rollout = d.policy.rollout(blocks, d.state.step)  # the step's own samples: seeded by (seed, step, id)
    assert rollout.temperature == ON_POLICY_TEMPERATURE == 1.0
    vocab, total, at_loss_t, tokens = len(d.tokenizer), 0.0, 0.0, 0
    with torch.no_grad():
        for mb in rollout.micro_batches:
            ids, attn = mb["input_ids"], mb["attention_mask"]
            s_logits = d.hf_student(ids, attention_mask=attn).logits[:, :-1, :vocab]
            t_logits = d.teacher(ids, attention_mask=attn).logits[:, :-1, :vocab]
            completion = mb["labels"][:, 1:] != IGNORE_INDEX  # the positions predicting a sampled token
            total += float(_reference_divergence(s_logits, t_logits, "jsd", beta)[completion].sum())
            scaled = loss_t**2 * _reference_divergence(s_logits, t_logits, "jsd", beta, loss_t)
            at_loss_t += float(scaled[completion].sum())
            tokens += int(completion.sum())
    metrics = d.train_step(blocks)
    assert metrics["policy_step"] == 1 and metrics["tokens"] == tokens > 0
    assert metrics["temperature"] == 1.0
    assert metrics["loss"] == pytest.approx(total / tokens, rel=1e-4)  # float32 vs float64
    assert abs(at_loss_t - total) > 0.02 * total  # 200x the tolerance above


def test_the_generation_temperature_shapes_the_samples(make_distiller, tiny_run_config):
    """The same seeds at two generation temperatures write different completions: the temperature moved
    out of the loss still acts on sampling."""
    written = []
    for temperature in (0.3, 3.0):
        raw = _policy_recipe(tiny_run_config, "on", temperature=temperature, eval_prompts=0)
        d = make_distiller(raw)
        assert d.policy.sampling.temperature == temperature
        rollout = d.policy.rollout(d._micro_batches(), 0)
        written.append(torch.cat([mb["input_ids"].flatten() for mb in rollout.micro_batches]))
    assert not torch.equal(*written)


# ------------------------------------------------------------------------------------------- the runs


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def test_lambda_zero_is_off_policy_kd_bit_for_bit(make_distiller, tiny_run_config, tmp_path):
    runs = {}
    for name, policy in (("off", "off"), ("mixed0", "mixed")):
        raw = _policy_recipe(tiny_run_config, policy, fraction=0.0, eval_prompts=0)
        make_distiller(raw, output_dir=str(tmp_path / name), max_steps=3).train()
        runs[name] = tmp_path / name
    a, b = _weights(runs["off"]), _weights(runs["mixed0"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(runs["off"]) == _losses(runs["mixed0"])


def test_on_policy_generation_is_deterministic_and_resumes_exactly(make_distiller, tiny_run_config, tmp_path):
    """mixed (both kinds of step): 2 steps + resume + 2 steps == 4 steps, bit for bit; a second run from
    scratch writes the same samples."""
    raw = _policy_recipe(tiny_run_config, "mixed", fraction=0.5, temperature=1.2, top_p=0.95, eval_prompts=4)
    raw["training"].update(
        max_steps=4, save_every=2, keep_last_n=5, batch_size=2, gradient_accumulation_steps=2
    )
    kinds = [is_policy_step("mixed", 0.5, 0, s) for s in range(4)]
    assert any(kinds) and not all(kinds)  # the seed gives both kinds of step in 4
    full = tmp_path / "full"
    make_distiller(raw, output_dir=str(full)).train()
    again = tmp_path / "again"
    make_distiller(raw, output_dir=str(again)).train()
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    shutil.rmtree(resumed / "final")
    (resumed / "summary.json").unlink()
    raw["training"]["output_dir"] = str(resumed)
    d = Distiller(load_config(raw)[0], resume="auto")
    assert d.state.step == 2
    d.train()
    for other in (again, resumed):
        a, b = _weights(full), _weights(other)
        assert all(torch.equal(a[k], b[k]) for k in a), other.name
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_step"] for r in records if "loss" in r] == [int(k) for k in kinds]
    summaries = [json.loads((r / "summary.json").read_text()) for r in (full, resumed)]
    assert summaries[0]["student_continuations"] == summaries[1]["student_continuations"]
    assert summaries[0]["generated_tokens"] == summaries[1]["generated_tokens"] > 0


def test_on_policy_accumulation_split_gives_the_same_update(make_distiller, tiny_run_config):
    raw = _policy_recipe(tiny_run_config, "on", temperature=1.5)
    raw["optimization"]["max_grad_norm"] = 1e9
    results = []
    for micro, accum in ((4, 1), (2, 2)):
        d = make_distiller(raw, batch_size=micro, gradient_accumulation_steps=accum)
        metrics = d.train_step(d._micro_batches())
        results.append((metrics, {k: v.detach().clone() for k, v in d.hf_student.state_dict().items()}))
    (m1, w1), (m2, w2) = results
    assert m1["gen_tokens"] == m2["gen_tokens"] and m1["tokens"] == m2["tokens"]
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_across_tokenizers_only_anchored_generated_positions_carry_the_loss(
    make_distiller, tiny_run_config, corpus, tmp_path
):
    from sakd.commands.demo import train_tokenizer

    raw = _policy_recipe(tiny_run_config, "on")
    raw["model"]["teacher_tokenizer"] = str(train_tokenizer(corpus, tmp_path / "ttok", 700))
    d = make_distiller(raw)
    assert d.alignment.differ
    rollout = d.policy.rollout(d._micro_batches(), 0)
    for mb in rollout.micro_batches:
        predicting = mb["labels"][:, 1:] != IGNORE_INDEX
        assert bool(predicting.any()) and bool((mb["anchor"][:, :-1][predicting] >= 0).all())
        assert bool((mb["labels"][:, :8] == IGNORE_INDEX).all())  # the prompt
    metrics = d.train_step(d._micro_batches())
    assert metrics["kd_positions"] == 1.0 and metrics["policy_step"] == 1


def test_sequence_level_trains_on_the_teachers_samples_with_ce(make_distiller, tiny_run_config):
    raw = _policy_recipe(tiny_run_config, "sequence", temperature=1.0)
    d = make_distiller(raw)
    blocks = d._micro_batches()
    rollout = d.policy.rollout(blocks, 0)
    assert not rollout.teacher_needed and rollout.objective.cfg.alpha == 0.0
    (mb,) = rollout.micro_batches
    (block,) = blocks
    prompts = block["input_ids"][:, :8].tolist()
    seeds = [row_seed(0, 0, int(i), 2) for i in block["sample_ids"]]
    expected = generate(d.teacher, prompts, Sampling(10), seeds=seeds, tokenizer=d.tokenizer)
    for row, prompt, completion in zip(mb["input_ids"].tolist(), prompts, expected, strict=True):
        assert row[: 8 + len(completion)] == prompt + completion
    metrics = d.train_step(blocks)  # CE only, on the teacher's tokens only
    assert metrics["loss"] == pytest.approx(metrics["ce"]) and "kd" not in metrics
    assert metrics["tokens"] == int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) == metrics["gen_tokens"]


def test_prompts_from_a_file_follow_their_own_plan(make_distiller, tiny_run_config, tmp_path):
    lines = [{"prompt": f"the city of number {i} has"} for i in range(10)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    raw = _policy_recipe(tiny_run_config, "on", prompts=str(path), prompt_field="prompt", prompt_tokens=24)
    d = make_distiller(raw)
    seen = []
    for step in range(3):  # 10 prompts, 4 per step: 2 steps an epoch, then a new order
        ((rows, ids),) = d.policy.prompts.for_step([], step, 0)
        seen.append(ids.tolist())
        texts = [d.tokenizer.decode(r) for r in rows]
        assert texts == [lines[i]["prompt"] for i in ids.tolist()]
    assert len(set(seen[0] + seen[1])) == 8 and seen[2] != seen[0]


def test_bad_policy_settings_are_one_line_config_errors(tiny_run_config):
    raw = _policy_recipe(tiny_run_config, "on", prompt_tokens=32)  # block_size is 32
    with pytest.raises(ConfigError, match="prompt_tokens=32 must be smaller than data.block_size"):
        load_config(raw)
    raw = _policy_recipe(tiny_run_config, "sideways")
    with pytest.raises(ConfigError, match="distillation.policy"):
        load_config(raw)


def test_continuation_scores_are_the_teachers_nll_of_what_the_student_wrote(make_distiller, tiny_run_config):
    d = make_distiller(_policy_recipe(tiny_run_config, "on"))
    prompts = [[40, 41, 42, 43], [50, 51, 52, 53]]
    spec = ContinuationSpec(prompts, max_new_tokens=6, seed=3)
    got = score_continuations(d.hf_student, d.teacher, spec, student_tokenizer=d.tokenizer)
    greedy = generate(d.hf_student, prompts, Sampling(6, greedy=True), seeds=[0, 0], tokenizer=d.tokenizer)
    nll, count = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, greedy, strict=True):
            logp = torch.log_softmax(d.teacher(torch.tensor([p + c])).logits[0].double(), -1)
            nll -= sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(c))
            count += len(c)
    assert got["cont_greedy_teacher_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["cont_greedy_tokens"] == count / 2 and got["cont_prompts"] == 2
    assert got["cont_sampled_teacher_nll"] != got["cont_greedy_teacher_nll"]
