"""A training run reading a teacher cache (``distillation.teacher_cache``) instead of running the teacher.

Before anything is trained the recipe is checked against the manifest, each mismatch one line naming the
field: the sparse loss mode it serves (:func:`open_teacher_cache`), then the teacher, its tokenizer and the
training documents (:func:`cached_teacher`); what a stored signal cannot give at all (hidden states, other
temperatures, new text) is refused from its capabilities (:mod:`sakd.objective.compose`). Then the run reads the cache's own blocks
(same tokenizer and block size) or an alignment of its blocks with the cached positions
(:mod:`~sakd.teacher.cache.lookup`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from sakd.align.positions import alignment_coverage
from sakd.config import RunConfig
from sakd.data import split_documents
from sakd.data.chat_pair import tokenize_conversation_ends
from sakd.errors import ConfigError, DataError, SetupError
from sakd.teacher.cache.fingerprint import (
    data_settings,
    documents_fingerprint,
    layout_settings,
    teacher_identity,
    tokenizer_sha256,
)
from sakd.teacher.cache.lookup import aligned_index
from sakd.teacher.cache.manifest import SignalSpec, first_difference, lookup, read_manifest
from sakd.teacher.cache.reader import CacheReader
from sakd.teacher.signal import LOSS_MODES, CachedTeacher


def cache_loss(cfg: RunConfig, spec: SignalSpec) -> tuple[RunConfig, list[str]]:
    """The run's config with ``distillation.loss.sparse`` resolved for a cache of ``spec`` (a copy: ``cfg`` is
    left as it was), and notes for the user. What the stored signal cannot give at all is refused by
    :func:`sakd.objective.compose.check_composition` from the cache's capabilities."""
    loss, notes = cfg.distillation.loss, []
    if loss.sparse == "none":
        loss = dataclasses.replace(loss, sparse=LOSS_MODES[spec.mode][0])
        notes.append(f"training from a {spec.mode} cache: distillation.loss.sparse={loss.sparse}")
    if spec.mode == "topk" and loss.sparse == "topk_tail":
        notes.append("a topk cache stores no tail: topk_tail derives it as 1 - sum(top-k), inexact when tiny")
    if loss.kd_top_k and spec.top_k is not None and loss.kd_top_k > spec.top_k:
        raise ConfigError(
            f"distillation.loss.kd_top_k={loss.kd_top_k} but the cache holds k={spec.top_k}; lower it "
            "(the best kd_top_k stored ids are used)"
        )
    distillation = dataclasses.replace(cfg.distillation, loss=loss)
    return dataclasses.replace(cfg, distillation=distillation), notes


def open_teacher_cache(cfg: RunConfig) -> tuple[CacheReader, RunConfig, list[str]]:
    """The reader of ``distillation.teacher_cache`` once every shard verifies, the run's config resolved for
    it (:func:`cache_loss`) and notes for the user."""
    root = cfg.distillation.teacher_cache
    reader = CacheReader(root, read_manifest(root))
    cfg, notes = cache_loss(cfg, reader.spec)
    reader.verify()
    return reader, cfg, notes


def _check_teacher(cfg: RunConfig, reader: CacheReader, teacher_tok: Any) -> None:
    """The teacher, then its tokenizer (a preset's config follows its tokenizer), then its config and seed."""
    root, m = reader.root, reader.manifest
    found = teacher_identity(cfg.model, teacher_tok, seed=cfg.training.seed + 1)
    head = f"teacher cache {root} does not match this recipe:"
    if found["source"] != m["teacher"]["source"]:
        raise SetupError(
            f"{head} model.teacher differs (cache: {m['teacher']['source']}, recipe: {found['source']})"
        )
    if tokenizer_sha256(teacher_tok) != m["tokenizer"]["sha256"]:
        raise SetupError(
            f"{head} the teacher tokenizer differs from the cache's ({m['tokenizer']['source']}); "
            "check model.teacher_tokenizer"
        )
    if found["config_sha256"] != m["teacher"]["config_sha256"]:
        raise SetupError(
            f"{head} the teacher's config differs from the one the cache was made with "
            f"(model.teacher {found['source']}); regenerate the cache"
        )
    if found["preset_seed"] != m["teacher"]["preset_seed"]:
        seed = m["teacher"]["preset_seed"]
        raise SetupError(
            f"{head} the preset teacher was initialised with seed {seed} (training.seed={seed - 1}), this run's "
            f"with {found['preset_seed']}; use training.seed={seed - 1} or regenerate the cache"
        )


def _check_layout(cfg: RunConfig, reader: CacheReader, teacher_tok: Any) -> None:
    """The packing, and for conversations the teacher's chat template and ``data.loss_on``: the same
    documents give other teacher positions (or other stored ones) when they differ."""
    m = {"format": "text", "packing": "cross_document", **reader.manifest["data"]}  # older text caches
    found = layout_settings(cfg.data, teacher_tok)
    field = first_difference(found, {k: m.get(k) for k in found})
    if field == "chat_template_sha256":
        raise DataError(
            f"teacher cache {reader.root} does not match this recipe: the teacher's chat template differs from "
            "the one the cache was made with; regenerate the cache"
        )
    if field is not None:
        raise DataError(
            f"teacher cache {reader.root} does not match this recipe: data.{field} differs (cache: {m.get(field)}, "
            f"recipe: {found[field]}); regenerate the cache"
        )


def _check_documents(cfg: RunConfig, reader: CacheReader, docs: Any) -> None:
    m = reader.manifest["data"]
    found = documents_fingerprint(docs)
    if found["documents_sha256"] == m["documents_sha256"]:
        return
    settings = data_settings(cfg.data, cfg.training.seed)
    field = first_difference({k: m.get(k) for k in settings}, settings)
    if field is not None:
        name = "training.seed (it draws the held-out split)" if field == "split_seed" else f"data.{field}"
        raise DataError(
            f"teacher cache {reader.root} does not match this recipe: {name} differs "
            f"(cache: {lookup(m, field)}, recipe: {settings[field]})"
        )
    raise DataError(
        f"teacher cache {reader.root} does not match this recipe: the training documents differ (cache: "
        f"{m['documents']} documents, sha256 {m['documents_sha256'][:12]}; now {found['documents']}, "
        f"{found['documents_sha256'][:12]}): the text of data.train changed since the cache was made"
    )


def cached_teacher(
    cfg: RunConfig, reader: CacheReader, student_tok: Any, alignment: Any, train_blocks: Any, accelerator: Any
) -> CachedTeacher:
    """The run's teacher signal from the cache, after the teacher / tokenizer / documents checks."""
    _check_teacher(cfg, reader, alignment.teacher_tokenizer)
    with accelerator.main_process_first():
        docs, _ = split_documents(cfg.data, cfg.training.seed)
    _check_documents(cfg, reader, docs)
    _check_layout(cfg, reader, alignment.teacher_tokenizer)
    spec = reader.spec
    same = (  # conversations: one vocabulary with another template is aligned too
        not alignment.aligned
        and cfg.data.block_size == spec.block_size
        and cfg.distillation.alignment.mode == "auto"
    )
    index = None
    if same and len(train_blocks) > reader.num_blocks:
        raise DataError(
            f"teacher cache {reader.root} holds {reader.num_blocks} blocks (made with data.max_train_blocks="
            f"{reader.manifest['data']['max_train_blocks']}); this run reads {len(train_blocks)}: lower "
            "data.max_train_blocks or regenerate the cache"
        )
    if same and not torch.equal(train_blocks[0]["input_ids"].cpu(), reader.block(0).token_ids):
        raise DataError(
            f"teacher cache {reader.root} does not match this recipe: its first block holds other tokens than "
            "the run's (the data or its packing changed); regenerate the cache"
        )
    if not same:
        index = _aligned(cfg, reader, student_tok, docs, train_blocks, accelerator, alignment)
    loss = cfg.distillation.loss
    return CachedTeacher(
        reader,
        index,
        top_k=loss.kd_top_k if spec.mode != "sampled" else None,
        chain_rule=cfg.distillation.alignment.chain_rule,
        device=accelerator.device,
    )


def _aligned(
    cfg: RunConfig,
    reader: CacheReader,
    student_tok: Any,
    docs: Any,
    train_blocks: Any,
    acc: Any,
    alignment: Any,
) -> Any:
    """The per-block alignment of the run's training blocks with the cached teacher positions."""
    key = f"{reader.manifest['shards'][0]['sha256']}:{tokenizer_sha256(student_tok)}"
    rows = None
    with acc.main_process_first():
        if cfg.data.format == "chat":  # the student's own renderings, aligned on the message contents
            rows = tokenize_conversation_ends(docs, student_tok, loss_on=cfg.data.loss_on, role="student")
            key += f":{getattr(student_tok, 'chat_template', None)}"
        index = aligned_index(docs, student_tok, cfg.data.block_size, reader, key, rows)
    n = len(train_blocks)
    same_tokens = len(index) >= n and all(
        torch.equal(index[i : min(i + 256, n)]["input_ids"], train_blocks[i : min(i + 256, n)]["input_ids"])
        for i in range(0, n, 256)
    )
    if not same_tokens:
        raise SetupError(
            "the cache alignment's blocks differ from the run's training blocks (a packing change)"
        )
    index = index.select(range(n))
    if int(index[n - 1]["cache_hi"]) <= int(index[n - 1]["cache_lo"]):
        raise DataError(
            f"teacher cache {reader.root} ends before this run's training text does (made with "
            f"data.max_train_blocks={reader.manifest['data']['max_train_blocks']}); lower data.max_train_blocks "
            "or regenerate the cache"
        )
    stats = alignment_coverage(index)
    alignment.stats.update(stats)
    acc.print(
        "alignment (teacher cache): {anchored:.1%} of student positions end on a cached teacher boundary, "
        "{multi_token:.1%} are spelt by several teacher tokens".format(**stats)
    )
    return index
