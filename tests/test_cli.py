"""Bad input gets one clear line on stderr and a non-zero exit, no traceback; --help works."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest

from sakd.cli import main
from sakd.commands.demo import train_tokenizer
from sakd.models import load_tokenizer


def _recipe(tmp_path, raw) -> str:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _fails(capsys, argv, message) -> None:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_missing_config(capsys, tmp_path):
    _fails(capsys, ["distill", "--config", str(tmp_path / "nope.yaml")], "config file not found")


def test_unknown_key_suggests(capsys, tmp_path, tiny_run_config):
    _fails(
        capsys,
        ["distill", "--config", _recipe(tmp_path, tiny_run_config), "training.max_step=3"],
        "did you mean 'training.max_steps'",
    )


def test_bad_value(capsys, tmp_path, tiny_run_config):
    _fails(
        capsys,
        ["distill", "--config", _recipe(tmp_path, tiny_run_config), "distillation.loss.alpha=2"],
        "'distillation.loss.alpha' must be <= 1",
    )


def test_missing_data(capsys, tmp_path, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["data"]["train"] = str(tmp_path / "missing.txt")
    _fails(capsys, ["distill", "--config", _recipe(tmp_path, raw)], "data file not found")


def test_missing_model_dir(capsys, tmp_path, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["teacher"] = str(tmp_path / "no_teacher")
    _fails(capsys, ["distill", "--config", _recipe(tmp_path, raw)], "model directory not found")


def test_missing_tokenizer_for_preset(capsys, tmp_path, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["tokenizer"] = None
    _fails(capsys, ["distill", "--config", _recipe(tmp_path, raw)], "needs model.tokenizer")


def test_existing_run_dir_needs_overwrite(capsys, tmp_path, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("someone else's work")
    _fails(capsys, ["distill", "--config", _recipe(tmp_path, raw)], "pass --overwrite")
    assert (run / "notes.txt").read_text() == "someone else's work"  # no data lost


def test_export_of_non_run(capsys, tmp_path):
    _fails(capsys, ["export", str(tmp_path), "--output", str(tmp_path / "out")], "not a sakd run directory")


def test_tokenizer_without_pad_token_is_handled(tmp_path, corpus):
    from transformers import AutoTokenizer

    tok_dir = train_tokenizer(corpus, tmp_path / "tok", 300)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_help_for_every_command():
    for cmd in ([], ["distill"], ["demo"], ["export"], ["eval"]):
        out = subprocess.run(
            [sys.executable, "-m", "sakd.cli", *cmd, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "usage: sakd" in out.stdout


def test_subprocess_error_has_no_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sakd.cli", "distill", "--config", str(tmp_path / "x.yaml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == f"sakd: error: config file not found: {tmp_path / 'x.yaml'}"


@pytest.mark.integration
def test_eval_command(capsys, tmp_path, tiny_run_config, corpus):
    raw = copy.deepcopy(tiny_run_config)
    raw["training"]["max_steps"] = 2
    assert main(["distill", "--config", _recipe(tmp_path, raw)]) == 0
    capsys.readouterr()
    final = tmp_path / "run" / "final"
    assert (
        main(
            [
                "eval",
                str(final),
                "--data",
                str(corpus),
                "--block-size",
                "32",
                "--max-blocks",
                "4",
                "--teacher",
                str(final),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["agreement"] == 1.0 and result["tokens"] == 4 * 31 and result["ppl"] > 1
    # the .txt file is one document by default; blocked scoring, its bytes and bits per byte reported
    assert result["documents"] == 1 and result["sample_by"] == "document" and result["method"] == "blocked"
    assert result["bpb"] == pytest.approx(result["loss"] * result["tokens"] / result["bytes"] / math.log(2))
    args = ["eval", str(final), "--data", str(corpus), "--block-size", "32", "--max-blocks", "4"]
    assert main([*args, "--stride", "8", "--sample-by", "line"]) == 0
    strided = json.loads(capsys.readouterr().out)
    assert strided["method"] == "strided" and strided["stride"] == 8
    tok = load_tokenizer(str(final))
    stream = []
    for line in corpus.read_text().splitlines()[:60]:
        stream += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # every token of the first 128 but the first, except the EOS after each line (never a target)
    assert strided["tokens"] == sum(1 for t in stream[1:128] if t != tok.eos_token_id) < 127
    # documents: the lines with a scored token among those 128 (not the file's 400: --max-blocks cut it)
    scored_lines = {
        stream[:j].count(tok.eos_token_id) for j in range(1, 128) if stream[j] != tok.eos_token_id
    }
    assert 1 < strided["documents"] == len(scored_lines) < 400
    _fails(capsys, [*args, "--stride", "64"], "--stride 64 must be between 1 and --block-size 32")
    _fails(
        capsys,
        [*args, "--sample-by", "paragraph", "--data", str(tmp_path / "recipe.json")],
        "applies to .txt files",
    )
    # the teacher (here the model itself) on the model's own continuations of 4 held-out prompts
    assert result["cont_prompts"] == 4 and 0 < result["cont_greedy_teacher_nll"] < result["loss"] + 5
    assert 0 < result["cont_greedy_tokens"] <= 64 and result["cont_sampled_teacher_bpb"] > 0


@pytest.mark.integration
def test_eval_scores_continuations_with_a_teacher_of_another_tokenizer(
    capsys, tmp_path, tiny_run_config, corpus
):
    from sakd.commands.demo import train_tokenizer
    from sakd.models import load_model, load_tokenizer

    raw = copy.deepcopy(tiny_run_config)
    raw["training"]["max_steps"] = 1
    assert main(["distill", "--config", _recipe(tmp_path, raw)]) == 0
    capsys.readouterr()
    teacher_tok = load_tokenizer(str(train_tokenizer(corpus, tmp_path / "ttok", 700)))
    teacher_dir = tmp_path / "teacher"
    load_model("tiny-moe", tokenizer=teacher_tok).save_pretrained(teacher_dir)
    teacher_tok.save_pretrained(teacher_dir)
    args = ["eval", str(tmp_path / "run" / "final"), "--data", str(corpus), "--block-size", "32"]
    assert main([*args, "--max-blocks", "3", "--teacher", str(teacher_dir), "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "agreement" not in result  # top-1 agreement needs one vocabulary; the continuations do not
    assert result["cont_prompts"] == 3 and result["cont_greedy_teacher_nll"] > 0
    assert result["cont_greedy_tokens"] <= 8


def test_top_k_larger_than_the_vocabulary(capsys, tmp_path, tiny_run_config):
    raw = copy.deepcopy(tiny_run_config)
    raw["distillation"]["loss"].update(sparse="topk_tail", kd_top_k=100_000)
    _fails(
        capsys, ["distill", "--config", _recipe(tmp_path, raw)], "kd_top_k=100000 is larger than the teacher"
    )


def test_a_pair_with_no_alignment_possible(capsys, tmp_path, tiny_run_config):
    """A teacher tokenizer that shares no token text with the student's (only EOS maps, by role)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["αβγ", "δεζ", "ηθι", "κλμ"]
    vocab = {"[UNK]": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>").save_pretrained(
        tmp_path / "greek"
    )
    raw = copy.deepcopy(tiny_run_config)
    raw["model"]["teacher_tokenizer"] = str(tmp_path / "greek")
    _fails(capsys, ["distill", "--config", _recipe(tmp_path, raw)], "no alignment possible")
