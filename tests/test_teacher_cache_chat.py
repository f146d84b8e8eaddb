"""An offline teacher cache with documents kept apart (``data.packing=within_document``) and over
conversations (``data.format=chat``): the cache's teacher sees each document alone, as the live teacher
does, so training from it equals live KD; a conversations cache stores the KD positions only -- counted
here from the conversations rendered by hand -- and reports the bytes that saves; a recipe whose template,
``loss_on`` or packing differs from the cache's is refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sakd.cli import main
from sakd.models import load_tokenizer
from sakd.teacher.cache.manifest import read_manifest

pytestmark = pytest.mark.integration

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Where does Bob live?"},
        {"role": "assistant", "content": "Bob lives in Stanford ."},
    ],
    [
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "they eat bread and cheese by the river ."},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "the river runs to the sea, twelve miles away ."},
    ],
    [
        {"role": "user", "content": "say nothing"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "now say something about the old town"},
        {"role": "assistant", "content": "something: the old town sleeps ."},
    ],
]
BLOCK = 32


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def _cache(raw: dict, out: Path, *overrides: str) -> int:
    recipe = out.parent / f"{out.name}.json"
    recipe.write_text(json.dumps(raw))
    return main(["cache-teacher", "--config", str(recipe), "--output", str(out), *overrides])


def _same_losses(online: list[dict], cached: list[dict], kd_abs: float = 0.0) -> None:
    """The per-step tolerances of tests/test_teacher_cache.py; ``kd_abs``: a conversations cache masks the KD
    rows it does not store, so its KD sums another set of rows (rounding at 1e-7 of a KD term of 0.04)."""
    assert len(online) == len(cached) == 4
    for a, b in zip(online, cached, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-5, abs=kd_abs)


def test_within_document_cache_equals_live_kd(tiny_run_config, make_distiller, tokenizer_dir, tmp_path):
    """Text packed within_document, every id stored in float32: the per-step losses equal live KD, whose
    teacher restarts positions at each document and keeps attention inside it (the cache's teacher read
    whole blocks across documents before; such a cache was refused)."""
    raw = copy.deepcopy(tiny_run_config)
    raw["data"].update(packing="within_document", max_train_blocks=32)
    vocab = len(load_tokenizer(str(tokenizer_dir)))
    overrides = [
        "distillation.cache.mode=topk_tail",
        f"distillation.cache.top_k={vocab}",
        "distillation.cache.values_dtype=float32",
    ]
    assert _cache(raw, tmp_path / "cache", *overrides) == 0
    assert read_manifest(tmp_path / "cache")["data"]["packing"] == "within_document"
    d = make_distiller(raw, output_dir=str(tmp_path / "online"))
    d.train()
    cached = copy.deepcopy(raw)
    cached["distillation"]["teacher_cache"] = str(tmp_path / "cache")
    d = make_distiller(cached, output_dir=str(tmp_path / "cached"))
    d.train()
    assert d.teacher is None
    _same_losses(_metrics(tmp_path / "online"), _metrics(tmp_path / "cached"))
    # a cross_document run must not read it: the same tokens, other teacher distributions
    cross = copy.deepcopy(cached)
    cross["data"]["packing"] = "cross_document"
    with pytest.raises(Exception, match="data.packing differs"):
        make_distiller(cross, output_dir=str(tmp_path / "cross"))


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir, tmp_path_factory):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("chat_tok")
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out))


def _by_hand(tok, messages):
    """Token targets and "ends inside an assistant content, short of its end" flags of the rendering
    written out here (not through the template or sakd.data.chat)."""
    text, spans, turns = "", [], []
    for m in messages:
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"]
        if m["role"] == "assistant":
            spans.append((start, len(text)))
            turns.append((start, len(text) + len("<|im_end|>")))
        text += "<|im_end|>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ends = [b for _, b in enc["offset_mapping"]]
    target = [any(a < e <= b for a, b in turns) for e in ends]
    inside = [any(a < e < b for a, b in spans) for e in ends]
    return target, inside


def _expected_stored(tok, convs, blocks: int) -> int:
    """Positions of the first ``blocks`` blocks whose next token (same block, same conversation) is a
    target, or whose own token ends inside an assistant content short of its end."""
    target, inside, first = [], [], []
    for m in convs:
        t, i = _by_hand(tok, m)
        target += t
        inside += i
        first += [True] + [False] * (len(t) - 1)
    n = 0
    for p in range(blocks * BLOCK):
        nxt = p + 1
        predicts = nxt % BLOCK != 0 and target[nxt] and not first[nxt]
        n += bool(predicts or inside[p])
    return n


@pytest.fixture(scope="module")
def chat_recipe(tiny_run_config_module, chat_tok, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("chat")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * 12))
    raw = copy.deepcopy(tiny_run_config_module)
    raw["model"]["tokenizer"] = str(chat_tok.name_or_path)
    raw["data"] = {"train": str(data), "eval": str(data), "format": "chat", "block_size": BLOCK}
    raw["data"].update(max_train_blocks=16, max_eval_blocks=2)
    raw["distillation"]["cache"] = {"mode": "topk_tail", "blocks_per_shard": 4, "batch_size": 4}
    raw["training"]["output_dir"] = str(tmp / "run")
    return raw


def test_chat_cache_stores_kd_positions_and_equals_live_chat_kd(
    chat_recipe, chat_tok, make_distiller, tmp_path, capsys
):
    """Same tokenizer and template, every id in float32: the cache stores exactly the positions counted by
    hand, reports the bytes saved (output and manifest), and training from it gives live chat KD's losses."""
    overrides = [
        "distillation.cache.mode=topk_tail",
        f"distillation.cache.top_k={len(chat_tok)}",
        "distillation.cache.values_dtype=float32",
    ]
    capsys.readouterr()
    assert _cache(chat_recipe, tmp_path / "cache", *overrides) == 0
    out = capsys.readouterr().out
    m = read_manifest(tmp_path / "cache")
    convs = [json.loads(x)["messages"] for x in Path(chat_recipe["data"]["train"]).read_text().splitlines()]
    stored = m["totals"]["stored_positions"]
    assert stored == _expected_stored(chat_tok, convs, m["layout"]["blocks"])
    assert 0 < stored < m["layout"]["positions"]
    assert m["signal"]["positions"] == "kd" and m["data"]["loss_on"] == "assistant"
    assert m["totals"]["bytes_saved"] == m["totals"]["bytes_all_positions"] - m["totals"]["bytes"] > 0
    line = [x for x in out.splitlines() if "saved vs every position" in x]
    assert len(line) == 1 and f"{m['totals']['bytes_saved']:,} bytes" in line[0]

    d = make_distiller(chat_recipe, output_dir=str(tmp_path / "online"))
    d.train()
    cached = copy.deepcopy(chat_recipe)
    cached["distillation"]["teacher_cache"] = str(tmp_path / "cache")
    d = make_distiller(cached, output_dir=str(tmp_path / "cached"))
    d.train()
    assert d.teacher is None
    _same_losses(_metrics(tmp_path / "online"), _metrics(tmp_path / "cached"), kd_abs=1e-6)

    # the same documents with another loss_on or another teacher template: other stored positions
    other = copy.deepcopy(cached)
    other["data"]["loss_on"] = "all"
    with pytest.raises(Exception, match=r"data.loss_on differs \(cache: assistant, recipe: all\)"):
        make_distiller(other, output_dir=str(tmp_path / "other"))
    tok = AutoTokenizer.from_pretrained(str(chat_tok.name_or_path))
    tok.chat_template = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{{ '' }}\n")
    tok.save_pretrained(tmp_path / "tok2")
    other = copy.deepcopy(cached)
    other["model"]["teacher_tokenizer"] = str(tmp_path / "tok2")
    with pytest.raises(Exception, match="chat template differs from the one the cache was made with"):
        make_distiller(other, output_dir=str(tmp_path / "other2"))


def test_chat_cache_serves_a_student_with_another_tokenizer(chat_recipe, chat_tok, corpus, tmp_path):
    """A conversations cache (the teacher's tokenizer and template) trains a student with another tokenizer
    aligned on the message contents. Every teacher id in float32 (topk_tail, k = V): each step's loss and
    KD equal the live cross-tokenizer chat path's. Sampled (the default mode, 128 draws): each step's KD is
    the live one's within the spread of a 128-draw estimate (see below)."""
    from sakd.commands.demo import train_tokenizer

    base = train_tokenizer(corpus, tmp_path / "sbase", 300)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "stok")
    raw = copy.deepcopy(chat_recipe)
    raw["model"].update(tokenizer=str(tmp_path / "stok"), teacher_tokenizer=str(chat_tok.name_or_path))
    raw["distillation"].update(alignment={"cache_dir": str(tmp_path / "maps")})
    runs = {}
    for name, overrides in (
        ("live", None),
        (
            "full",
            [
                "distillation.cache.mode=topk_tail",
                f"distillation.cache.top_k={len(chat_tok)}",
                "distillation.cache.values_dtype=float32",
            ],
        ),
        ("sampled", ["distillation.cache.mode=sampled"]),
    ):
        run = copy.deepcopy(raw)
        if overrides is not None:
            assert _cache(chat_recipe, tmp_path / f"cache-{name}", *overrides) == 0
            run["distillation"]["teacher_cache"] = str(tmp_path / f"cache-{name}")
        run["training"].update(output_dir=str(tmp_path / name), max_steps=2)
        recipe = tmp_path / f"{name}.json"
        recipe.write_text(json.dumps(run))
        assert main(["distill", "--config", str(recipe)]) == 0
        runs[name] = _metrics(tmp_path / name)
    live, full, sampled = runs["live"], runs["full"], runs["sampled"]
    assert len(live) == len(full) == len(sampled) == 2 and all(r["kd"] > 0 for r in live)
    for a, b, c in zip(live, full, sampled, strict=True):
        # k = V, float32: measured within 0.53% of live (KD) and 0.07% (loss); not bitwise as the one-tokenizer
        # cache above is -- where the cached rows differ from the live chat path's is not yet located
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
        assert b["kd"] == pytest.approx(a["kd"], rel=1e-2)
        # 128 draws: the value's per-position spread is sd(log P/Q)/sqrt(128), ~0.2 nats for this near-uniform
        # tiny teacher, and the estimate of the drawn buckets' mass leaves a bias of at most ~0.1 nats at this
        # teacher entropy (tests/test_losses_sparse.py); measured |sampled - live| = 0.009 and 0.059
        assert abs(c["kd"] - a["kd"]) < 0.1, (c["kd"], a["kd"])
