"""Every `sakd` command in the README's fenced blocks runs as written.

The commands are read from README.md (not copied here), in order, in a working directory that holds what
their words name: `/models/my-teacher` and `/models/my-student` (tiny models saved as Hugging Face
directories, under this directory's `models/`), `corpus.jsonl`, `heldout.txt`, `RECIPE.yaml`, `other-student`
and `other-tokenizer` (a student with another tokenizer), `teacher-dir`. The only words added: a small
budget after every `sakd distill` / `sakd cache-teacher` (BUDGET) -- the README's recipes train hundreds of
steps. `[...]` (optional arguments) is run with its contents. Commands whose output the README shows
(`$ sakd plan ...`) must print that output. `sakd assets` commands that take longer than a few seconds or
need a Debian package run in the slow tier (tests/test_real_assets.py covers the assets themselves).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from sakd.commands.main import main

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
BUDGET = [
    "training.max_steps=2",
    "training.batch_size=2",
    "training.eval_every=0",
    "training.save_every=0",
    "data.block_size=32",
    "data.max_eval_blocks=4",
    "logging.progress_bar=false",
]
SLOW_ASSETS = ("sakd assets smollm2", "sakd assets kjv")

pytestmark = pytest.mark.integration


def readme_commands() -> list[tuple[str, list[str]]]:
    """(the README's text of the command, its argv after `sakd`), in README order; `\\` joins lines,
    `#` comments go, `$ ` prompts go, and what follows a prompted command (its output) is not a command."""
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            text = line.strip().removeprefix("$ ")
            if not text.startswith("sakd "):
                continue
            text = text.split(" #", 1)[0].strip()
            argv = shlex.split(re.sub(r"\[([^\]]*)\]", r"\1", text))[1:]
            commands.append((" ".join(text.split()), argv))
    return commands


def shown_output(command_start: str) -> list[str]:
    """The lines the README shows after a `$ sakd ...` command, up to the end of its block."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), re.S):
        if block.lstrip().startswith("$ " + command_start):
            body = block.replace("\\\n", " ").splitlines()
            return [ln for ln in body[1:] if ln.strip()]
    raise AssertionError(f"no `$ {command_start}` block in README")


@pytest.fixture(scope="module")
def workdir(corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sakd.commands.demo import train_tokenizer
    from sakd.models.presets import build_preset_config

    work = tmp_path_factory.mktemp("readme")
    (work / "sakd").symlink_to(ROOT / "sakd")  # `--config sakd/recipes/...` as from the repository root
    docs = [ln for ln in corpus.read_text().splitlines() if ln.strip()]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:300]))
    (work / "heldout.txt").write_text("\n".join(docs[300:340]) + "\n")

    def save(preset: str, tok_dir: Path, out: Path) -> None:
        tok = AutoTokenizer.from_pretrained(tok_dir)
        ids = {
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        model = AutoModelForCausalLM.from_config(build_preset_config(preset, len(tok), **ids))
        model.save_pretrained(out)
        tok.save_pretrained(out)

    save("tiny-moe", tokenizer_dir, work / "models" / "my-teacher")
    save("tiny-dense", tokenizer_dir, work / "models" / "my-student")
    other_tok = train_tokenizer(corpus, work / "other-tokenizer", 320)
    save("tiny-dense", other_tok, work / "other-student")
    (work / "teacher-dir").symlink_to(work / "models" / "my-teacher")
    recipe = {
        "model": {"teacher": "models/my-teacher", "student": "models/my-student"},
        "data": {"train": "corpus.jsonl"},
        "distillation": {"loss": {"alpha": 0.5, "temperature": 1.0}},
        "training": {"output_dir": "runs/recipe"},
    }
    (work / "RECIPE.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    return work


def _run(argv: list[str], work: Path) -> int:
    argv = [a.replace("/models/", f"{work}/models/") for a in argv]
    if argv[0] in ("distill", "cache-teacher") and "--verify" not in argv:
        argv = [*argv, *BUDGET]
    return main(argv)


def test_readme_shows_the_commands_this_test_runs() -> None:
    names = {argv[0] for _, argv in readme_commands()}
    assert {"distill", "export", "eval", "cache-teacher", "plan", "assets"} <= names


def test_every_readme_command_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(workdir)
    # `sakd export ... --adapter` exports a PEFT run: the README's PEFT section trains one like this
    lora = [
        "distill",
        "--config",
        "RECIPE.yaml",
        "model.peft.method=lora",
        "training.output_dir=runs/my-lora-run",
    ]
    assert _run(lora, workdir) == 0
    ran = []
    for text, argv in readme_commands():
        if text.startswith(SLOW_ASSETS):
            continue
        capsys.readouterr()
        rc = _run(argv, workdir)
        out, err = capsys.readouterr()
        assert rc == 0, f"`{text}` exited {rc}: {err.strip()[-500:]}"
        ran.append(text)
        if text.startswith("sakd plan"):
            printed = [ln for ln in out.splitlines() if ln.strip()]
            assert printed[: len(shown := shown_output("sakd plan"))] == shown
    assert len(ran) >= 10
    assert (workdir / "my-student" / "model.safetensors").is_file()
    assert (workdir / "my-adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((workdir / "runs" / "b" / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("start", SLOW_ASSETS)
def test_slow_readme_asset_commands_run(start: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if start.endswith("kjv") and shutil.which("bible") is None:
        pytest.skip("`sakd assets kjv` needs Debian's bible-kjv (apt-get install bible-kjv)")
    monkeypatch.chdir(tmp_path)
    (argv,) = [argv for text, argv in readme_commands() if text.startswith(start)]
    assert main(argv) == 0
