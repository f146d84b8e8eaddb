"""DistillationTrainer on conversations and its guards (moved out of tests/test_integrations.py, which holds the
Trainer-vs-`sakd distill` comparisons on text): chat policies repeat `sakd distill`, a same-vocabulary teacher
reads its own template, a non-finite-gradient step is skipped, TrainerStages refuses stages in epochs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_integrations import (  # tests/ is on sys.path (pytest rootdir-less import)
    _args,
    _assert_repeats,
    _reference,
    _tiny_trainer,
)

from sakd.integrations import DistillationTrainer
from sakd.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def chat_tok_dir(tokenizer_dir, tmp_path_factory):
    """The test tokenizer with ChatML's markers and template (tests/test_chat_policy.py's student)."""
    from test_chat_policy import CHATML, _with_template  # tests/ is on sys.path (pytest rootdir-less import)

    out = tmp_path_factory.mktemp("chat") / "tok"
    _with_template(tokenizer_dir, ["<|im_start|>", "<|im_end|>"], CHATML, out)
    return out


def _chat_recipe(tiny_run_config, tmp_path, chat_tok_dir, policy: str) -> dict:
    from test_chat_policy import CONVERSATIONS

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 8))
    raw = copy.deepcopy(tiny_run_config)
    raw["data"] = {"train": str(data), "format": "chat", "block_size": 96, "max_eval_blocks": 4}
    raw["model"]["tokenizer"] = str(chat_tok_dir)
    generation = {"prompt_tokens": 64, "max_new_tokens": 8, "eval_prompts": 0, "fraction": 0.5}
    raw["distillation"].update(policy=policy, generation=generation, feature={"weight": 0.5})
    return raw


@pytest.mark.parametrize(("policy", "given"), [("on", "collator"), ("mixed", "data"), ("off", "collator")])
def test_chat_policies_under_the_trainer_repeat_sakd_distill(
    policy, given, tiny_run_config, make_distiller, chat_tok_dir, tmp_path
):
    """distillation.policy over conversations (data.format=chat) under DistillationTrainer: the prompts are
    the training conversations cut at their last user turn (not a block's first prompt_tokens tokens), the
    answer stops at the template's end of turn and only its tokens carry loss -- sakd distill's chat path,
    so the losses, the generated tokens and the weights are sakd distill's (2 micro-batches of 2 against 1
    of 4). The Trainer reads the data section from prepare_distillation_data's collator, or from its whole
    result passed as data= (review: it built the policy's prompts as for text). off, and mixed's off-policy
    step: the blocks' loss_on targets and document positions reach the collator (the Trainer dropped those
    columns, so every token of a block, template included, carried loss)."""
    from sakd.integrations import prepare_distillation_data

    raw = _chat_recipe(tiny_run_config, tmp_path, chat_tok_dir, policy)
    ref = _reference(make_distiller, raw)
    tok = load_tokenizer(str(chat_tok_dir))
    data = prepare_distillation_data(raw["data"], tok, seed=0)  # sakd distill's split: training.seed = 0
    assert torch.equal(data.train["input_ids"][:], ref["data"].train["input_ids"][:])
    given_data = {"data_collator": data.collator} if given == "collator" else {"data": data}
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path / "hf", seed=0, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        distillation=raw["distillation"],
        train_dataset=ref["rows"],
        processing_class=tok,
        **given_data,
    )
    trainer.model.aux.load_state_dict(ref["aux0"])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if policy != "off":
        assert [h["policy_step"] for h in logs] == [m["policy_step"] for m in ref["metrics"]]
        assert logs[0]["gen_tokens"] > 0
    _assert_repeats(trainer, logs, ref)


def test_a_step_with_a_non_finite_gradient_leaves_the_weights_alone(tokenizer_dir, corpus, tmp_path):
    """A NaN gradient at step 1 (the loss finite): the Trainer skips that update as sakd distill does -- the
    weights after it are those before it (finite), the optimizer's state does not count it and the schedule
    does not advance; the next step trains again (review: optimizer.step() put the NaN into the weights)."""
    import math

    from transformers import TrainerCallback

    trainer = _tiny_trainer(tokenizer_dir, corpus, tmp_path, args={"max_steps": 3})
    weights = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append({k: v.detach().clone() for k, v in trainer.student.state_dict().items()})

    trainer.add_callback(Record())
    first = next(trainer.student.parameters())
    first.register_hook(lambda g: g * math.nan if trainer.state.global_step == 1 else g)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert not math.isfinite(logs[1]["grad_norm"]) and math.isfinite(logs[2]["grad_norm"])
    for k, v in weights[1].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, weights[0][k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, weights[1][k]) for k, v in weights[2].items())  # step 2 trained
    assert trainer.optimizer.state[first]["step"] == 2  # steps 0 and 2
    assert logs[2]["learning_rate"] == logs[1]["learning_rate"]  # the schedule waited a step


@pytest.mark.parametrize(("bad", "stops_at"), [({1, 2, 4, 5}, None), ({1, 2, 3, 4}, 3)])
def test_too_many_non_finite_steps_in_a_row_stop_the_trainer(bad, stops_at, tokenizer_dir, corpus, tmp_path):
    """max_consecutive_skips=3, as sakd distill's training.max_consecutive_skips: NaN gradients at steps 1, 2,
    4, 5 (never 3 in a row) train to the end; at steps 1-4 the third skip in a row (step 3) raises
    NonFiniteError and the weights are still step 0's (a diverged run stopped instead of skipping to the end
    with nothing learned)."""
    import math

    from sakd.training.loop import NonFiniteError

    trainer = _tiny_trainer(tokenizer_dir, corpus, tmp_path, args={"max_steps": 6}, max_consecutive_skips=3)
    first = next(trainer.student.parameters())
    first.register_hook(lambda g: g * math.nan if trainer.state.global_step in bad else g)
    after_first: dict[str, torch.Tensor] = {}
    first.register_hook(
        lambda g: after_first.update(w=first.detach().clone()) or g if trainer.state.global_step == 1 else g
    )
    if stops_at is None:
        trainer.train()
        assert trainer.state.global_step == 6 and trainer.hooks.consecutive_skips == 2
        return
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        trainer.train()
    assert trainer.state.global_step == stops_at
    torch.testing.assert_close(first.detach(), after_first["w"], rtol=0, atol=0)


def test_max_consecutive_skips_below_one_is_refused(tokenizer_dir, corpus, tmp_path):
    """0 would stop a run at its first skipped step: refused in one line, as training.max_consecutive_skips."""
    from sakd.config import ConfigError

    with pytest.raises(ConfigError, match="max_consecutive_skips must be at least 1, not 0"):
        _tiny_trainer(tokenizer_dir, corpus, tmp_path, max_consecutive_skips=0)


def test_trainer_stages_refuse_stages_in_epochs(tokenizer_dir, corpus, tmp_path):
    """A stage given in epochs would end where sakd distill's plan counts an epoch (whole steps of
    batch x accumulation x ranks), not where the Trainer's dataloader does (its last partial batch
    included): TrainerStages takes stages in steps and says so (review: it silently used the floor count)."""
    from sakd.config import ConfigError
    from sakd.integrations import TrainerStages

    trainer = _tiny_trainer(tokenizer_dir, corpus, tmp_path, args={"max_steps": 4})
    stages = {"stages": [{"steps": 2}, {"epochs": 1.0}]}
    with pytest.raises(ConfigError, match=r"stages\[1\].*in steps"):
        TrainerStages(trainer, stages)


def test_a_teacher_with_its_own_template_reads_its_own_rendering(tiny_run_config, chat_tok_dir, tmp_path):
    """One vocabulary, two chat templates: over conversations the teacher reads the conversation in its own
    template (the batches carry its tokens and the alignment), as setup_alignment(own_templates) does for
    sakd distill (review: the Trainer never passed own_templates, so the teacher read the student's)."""
    from transformers import AutoTokenizer

    from sakd.integrations import prepare_distillation_data

    raw = _chat_recipe(tiny_run_config, tmp_path, chat_tok_dir, "off")
    tok = load_tokenizer(str(chat_tok_dir))
    teacher_tok = AutoTokenizer.from_pretrained(str(chat_tok_dir))
    teacher_tok.chat_template = tok.chat_template.replace("<|im_end|>\n", "<|im_end|>\n\n")
    assert teacher_tok.get_vocab() == tok.get_vocab() and teacher_tok.chat_template != tok.chat_template
    data = prepare_distillation_data(raw["data"], tok, teacher_tok, seed=0)
    assert "teacher_input_ids" in data.train.column_names
    trainer = DistillationTrainer(
        load_model("tiny-dense", tokenizer=tok, seed=0),
        _args(tmp_path / "hf", max_steps=1),
        teacher=load_model("tiny-moe", tokenizer=tok, seed=1),
        teacher_tokenizer=teacher_tok,
        distillation=raw["distillation"],
        data=data,
        processing_class=tok,
    )
    assert trainer.alignment.aligned and not trainer.alignment.differ
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert 0 < logs[0]["kd_positions"] <= 1
