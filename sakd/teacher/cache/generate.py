"""``sakd cache-teacher``: run the frozen teacher once over a recipe's training documents and store its
signal, sharded, resumable, on any number of ranks.

* The teacher reads its own packed blocks (:mod:`~sakd.teacher.cache.blocks`: what ``sakd distill``
  would feed it for a student with its tokenizer), placed as in ``sakd distill``
  (:func:`sakd.teacher.placement.load_teacher`: dtype, ZeRO-3 partitioning, offload, 8/4-bit on GPU).
* Blocks are grouped into shards of ``distillation.cache.blocks_per_shard``; shard ``s`` belongs to rank
  ``s mod world`` and is computed in fixed batches from its first block, so its bytes do not depend on the
  number of ranks. A shard is written to a temporary file and renamed, then recorded with its SHA-256; a
  rerun skips every recorded shard whose file still matches (an interrupted run resumes).
* Under a ZeRO-3 teacher every forward is a collective: a rank with less work runs throw-away forwards
  until every rank is done.
* Rank 0 writes ``manifest.json`` last (:mod:`~sakd.teacher.cache.manifest`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sakd.config import RunConfig
from sakd.data import split_documents
from sakd.data.chat_pair import tokenize_conversation_ends
from sakd.data.documents import document_mask
from sakd.errors import ConfigError, DataError, RunDirError
from sakd.models import load_tokenizer
from sakd.progress import Progress
from sakd.teacher.cache.bitpack import bits_for
from sakd.teacher.cache.blocks import token_blocks
from sakd.teacher.cache.extract import block_signals
from sakd.teacher.cache.fingerprint import (
    data_settings,
    documents_fingerprint,
    layout_settings,
    teacher_identity,
    teacher_tokenizer_spec,
    tokenizer_sha256,
)
from sakd.teacher.cache.kept import kd_positions, saved_line
from sakd.teacher.cache.manifest import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PLAN_FILE,
    SHARD_DIR,
    SignalSpec,
    first_difference,
    read_manifest,
    shard_file,
    shard_record_file,
    write_json_atomic,
)
from sakd.teacher.cache.shardfile import encode_shard
from sakd.teacher.cache.verify import file_sha256
from sakd.teacher.placement import load_teacher
from sakd.teacher.signal import OnlineTeacher

log = logging.getLogger(__name__)


@dataclass
class CacheJob:
    """Everything a cache is made from, built once on every rank."""

    cfg: RunConfig
    tokenizer: Any
    blocks: Any  # datasets.Dataset of token_blocks rows
    spec: SignalSpec
    header: dict[str, Any]  # the manifest without shards and totals

    @property
    def num_shards(self) -> int:
        return -(-len(self.blocks) // self.cfg.distillation.cache.blocks_per_shard)

    def shard_blocks(self, shard: int) -> range:
        per = self.cfg.distillation.cache.blocks_per_shard
        return range(shard * per, min((shard + 1) * per, len(self.blocks)))


def signal_spec(cfg: RunConfig, vocab_size: int, router_shape: list[int] | None) -> SignalSpec:
    """The :class:`SignalSpec` the recipe asks for (``distillation.cache``)."""
    c = cfg.distillation.cache
    if c.mode != "sampled" and c.top_k > vocab_size:
        raise ConfigError(
            f"distillation.cache.top_k={c.top_k} is larger than the teacher's vocabulary ({vocab_size}); lower it"
        )
    kind = cfg.distillation.loss.kind
    if c.mode == "sampled" and kind != "fkl":
        raise ConfigError(
            f"distillation.cache.mode=sampled (the default) trains forward KL only, but distillation.loss.kind="
            f"{kind}: set distillation.cache.mode=topk_tail"
        )
    return SignalSpec(
        mode=c.mode,
        top_k=None if c.mode == "sampled" else c.top_k,
        num_samples=c.num_samples if c.mode == "sampled" else None,
        temperature=float(c.temperature or cfg.distillation.loss.temperature),
        values_dtype=c.values_dtype,
        vocab_size=vocab_size,
        index_bits=bits_for(vocab_size),
        block_size=cfg.data.block_size,
        router_shape=router_shape,
        seed=(cfg.training.seed if c.seed is None else c.seed) if c.mode == "sampled" else None,
        positions="kd" if cfg.data.format == "chat" else "all",
    )


def _router_shape(cfg: RunConfig, tokenizer: Any) -> list[int] | None:
    """``[layers, experts]`` of an MoE teacher when the router is to be stored (from its config)."""
    if not cfg.distillation.cache.router:
        return None
    from sakd.models import is_preset, preset_config_for

    spec = cfg.model.teacher
    if is_preset(spec):
        config = preset_config_for(spec, tokenizer)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec, trust_remote_code=cfg.model.trust_remote_code)
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        raise ConfigError("distillation.cache.router needs an MoE teacher; this one has no experts")
    return [int(config.num_hidden_layers), int(experts)]


def build_job(cfg: RunConfig, accelerator: Any) -> CacheJob:
    """Tokenize and pack the recipe's training documents with the teacher's tokenizer; the header."""
    tok_spec = teacher_tokenizer_spec(cfg.model)
    if tok_spec is None:
        raise ConfigError("the teacher is a preset: set model.teacher_tokenizer (or model.tokenizer)")
    tokenizer = load_tokenizer(tok_spec, trust_remote_code=cfg.model.trust_remote_code)
    seed = cfg.training.seed
    with accelerator.main_process_first():
        docs, _ = split_documents(cfg.data, seed)
        rows = None
        if cfg.data.format == "chat":  # the teacher's renderings, content coordinates, KD flags
            rows = tokenize_conversation_ends(docs, tokenizer, loss_on=cfg.data.loss_on)
        blocks = token_blocks(docs, tokenizer, cfg.data.block_size, rows)
    if len(blocks) == 0:
        raise DataError(
            f"the training data is shorter than one block of {cfg.data.block_size} teacher tokens"
        )
    if cfg.data.max_train_blocks:
        blocks = blocks.select(range(min(cfg.data.max_train_blocks, len(blocks))))
    spec = signal_spec(cfg, len(tokenizer), _router_shape(cfg, tokenizer))
    per = cfg.distillation.cache.blocks_per_shard
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "teacher": teacher_identity(cfg.model, tokenizer, seed=seed + 1),
        "tokenizer": {
            "source": tok_spec,
            "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": len(tokenizer),
        },
        "data": {
            **documents_fingerprint(docs),
            **data_settings(cfg.data, seed),
            **layout_settings(cfg.data, tokenizer),
            "max_train_blocks": cfg.data.max_train_blocks,
        },
        "signal": spec.to_dict(),
        "layout": {
            "blocks": len(blocks),
            "positions": len(blocks) * spec.block_size,
            "blocks_per_shard": per,
        },
        "generation": {
            "teacher_dtype": cfg.model.teacher_dtype,
            "quantization": cfg.model.teacher_quantization,
        },
    }
    header["layout"]["shards"] = -(-len(blocks) // per)
    return CacheJob(cfg, tokenizer, blocks.with_format("torch"), spec, header)


def prepare_output(root: Path, header: dict[str, Any], accelerator: Any, *, overwrite: bool) -> bool:
    """Make ``root`` ready for ``header``'s cache; True when a complete one is already there."""
    state, found = "fresh", None
    if (root / MANIFEST_FILE).is_file():
        state, found = "complete", read_manifest(root)
    elif (root / PLAN_FILE).is_file():
        state, found = "partial", json.loads((root / PLAN_FILE).read_text())
    elif root.exists() and any(root.iterdir()):
        state = "other"
    differs = None if found is None else first_difference(_comparable(header), _comparable(found))
    if not overwrite and (state == "other" or differs is not None):
        what = "something else" if state == "other" else f"a cache of another recipe ({differs} differs)"
        raise RunDirError(f"{root} holds {what}; pass --overwrite or choose another --output")
    complete = state == "complete" and differs is None and not overwrite
    if accelerator.is_main_process and not complete:
        if overwrite and root.exists():
            shutil.rmtree(root)
        (root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        if state != "partial" or overwrite:
            write_json_atomic(root / PLAN_FILE, header)
    accelerator.wait_for_everyone()
    return complete


def _comparable(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in ("shards", "totals")}


def shard_done(root: Path, shard: int) -> bool:
    """Whether shard ``shard`` was written by an earlier (interrupted) run and still matches its record."""
    record, path = root / shard_record_file(shard), root / shard_file(shard)
    if not (record.is_file() and path.is_file()):
        return False
    try:
        rec = json.loads(record.read_text())
    except ValueError:
        return False
    return path.stat().st_size == rec.get("bytes") and file_sha256(path) == rec.get("sha256")


def write_shard(root: Path, shard: int, blocks: range, signals: list, spec: SignalSpec) -> dict[str, Any]:
    """Encode, write (temporary file + rename) and record one shard."""
    tensors, meta = encode_shard(signals, spec)
    data = safetensors.torch.save(tensors, metadata=meta)
    path = root / shard_file(shard)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    record = {
        "file": shard_file(shard),
        "blocks": [blocks.start, blocks.stop],
        "positions": len(blocks) * spec.block_size,
        "stored_positions": sum(
            int(b.kept.sum()) if b.kept is not None else len(b.token_ids) for b in signals
        ),
        "entries": int(tensors["values"].shape[0]) * (1 if spec.mode == "sampled" else int(spec.top_k)),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if spec.positions == "kd":  # what storing every position would have taken (the bytes saved)
        every = dataclasses.replace(spec, positions="all")
        record["bytes_all_positions"] = len(safetensors.torch.save(*encode_shard(signals, every)))
    write_json_atomic(root / shard_record_file(shard), record)
    return record


def _batches(job: CacheJob, shards: list[int]) -> list[tuple[int, list[int]]]:
    """This rank's (shard, block ids) forwards, in order; each shard's batches start at its first block."""
    size = job.cfg.distillation.cache.batch_size or job.cfg.training.batch_size
    out = []
    for s in shards:
        ids = list(job.shard_blocks(s))
        out += [(s, ids[i : i + size]) for i in range(0, len(ids), size)]
    return out


def _forward_batch(teacher: OnlineTeacher, job: CacheJob, ids: list[int], device: torch.device) -> list:
    """The teacher's signal of blocks ``ids``, as the live path runs it: with ``within_document`` packing
    the document mask (positions restarting per document, attention inside each); for conversations the
    positions that carry KD marked (:func:`kd_positions`)."""
    rows = job.blocks[ids]
    mask = torch.ones_like(rows["input_ids"])
    if job.cfg.data.resolved_packing() == "within_document":
        mask = document_mask(rows["position"])
    blocks = {
        "input_ids": rows["input_ids"].to(device),
        "char_end": rows["char_end"],
        "char_base": rows["char_base"],
        "follows_previous": rows["follows_previous"],
        "next_id": rows["next_id"],
        "block_index": torch.tensor(ids),
    }
    out = teacher({"input_ids": blocks["input_ids"], "attention_mask": mask.to(device)})
    signals = block_signals(out, blocks, job.spec)
    if job.spec.positions == "kd":
        for signal, kept in zip(signals, kd_positions(rows, job.cfg.data.resolved_packing()), strict=True):
            signal.kept = kept
    return signals


def _run_shards(job: CacheJob, root: Path, teacher: OnlineTeacher, accelerator: Any, lockstep: bool) -> int:
    """Compute and write this rank's unfinished shards; returns the positions computed here."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = [s for s in range(job.num_shards) if s % world == rank]
    todo = [s for s in mine if not shard_done(root, s)]
    batches = _batches(job, todo)
    rounds = len(batches)
    if lockstep and world > 1:  # a ZeRO-3 forward is a collective: every rank runs as many
        rounds = int(accelerator.reduce(torch.tensor(rounds, device=accelerator.device), reduction="max"))
    bs = job.spec.block_size
    total = sum(len(ids) for _, ids in batches) * bs
    bar = Progress(
        total,
        unit="tok",
        desc=f"cache-teacher (rank {rank})" if world > 1 else "cache-teacher",
        enabled=accelerator.is_main_process and job.cfg.logging.progress_bar,
        every=max(1, total // 20),  # off a terminal: a line per 5 %
    )
    pending: dict[int, list] = {}
    done = 0
    for r in range(rounds):
        if r >= len(batches):  # nothing left here: a throw-away forward keeps the collective in step
            ids = job.blocks[[0]]["input_ids"].to(accelerator.device)
            teacher({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            continue
        shard, ids = batches[r]
        pending.setdefault(shard, []).extend(_forward_batch(teacher, job, ids, accelerator.device))
        done += len(ids) * bs
        bar.advance(len(ids) * bs)
        if len(pending[shard]) == len(job.shard_blocks(shard)):
            write_shard(root, shard, job.shard_blocks(shard), pending.pop(shard), job.spec)
    bar.close()
    return done


def finish_manifest(job: CacheJob, root: Path) -> dict[str, Any]:
    """Rank 0: gather the shard records into ``manifest.json`` (written last), then drop them."""
    shards = []
    for s in range(job.num_shards):
        record = root / shard_record_file(s)
        if not record.is_file():
            raise RunDirError(f"shard {s} of {root} was not written by any rank; rerun to finish the cache")
        shards.append(json.loads(record.read_text()))
    total = sum(r["bytes"] for r in shards)
    positions = job.header["layout"]["positions"]
    totals = {"bytes": total, "bytes_per_token": round(total / max(positions, 1), 3)}
    if job.spec.positions == "kd":
        every = sum(r["bytes_all_positions"] for r in shards)
        totals.update(
            stored_positions=sum(r["stored_positions"] for r in shards),
            bytes_all_positions=every,
            bytes_saved=every - total,
        )
    manifest = {**job.header, "shards": shards, "totals": totals}
    write_json_atomic(root / MANIFEST_FILE, manifest)
    for s in range(job.num_shards):
        (root / shard_record_file(s)).unlink(missing_ok=True)
    (root / PLAN_FILE).unlink(missing_ok=True)
    return manifest


def generate_cache(cfg: RunConfig, output: str | Path, accelerator: Any, *, overwrite: bool = False) -> dict:
    """Write (or finish) the teacher cache of ``cfg`` at ``output``; returns its manifest and timing."""
    root = Path(output)
    job = build_job(cfg, accelerator)
    if prepare_output(root, job.header, accelerator, overwrite=overwrite):
        accelerator.print(f"{root} already holds this cache (complete); nothing to do")
        return {**read_manifest(root), "seconds": 0.0, "computed_positions": 0, "per_rank": []}
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config if plugin else None
    model, placement = load_teacher(
        cfg.model, job.tokenizer, accelerator, ds_config, seed=cfg.training.seed + 1
    )
    teacher = OnlineTeacher(model, aligned=False)
    lay = job.header["layout"]
    accelerator.print(
        f"cache-teacher: {lay['blocks']} blocks x {job.spec.block_size} tokens in {lay['shards']} shards, "
        f"mode {job.spec.mode}, teacher {placement} on {accelerator.num_processes} process(es)"
    )
    start = time.perf_counter()
    computed = _run_shards(job, root, teacher, accelerator, lockstep=placement == "zero3")
    per_rank = accelerator.gather(torch.tensor([computed], device=accelerator.device)).tolist()
    seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    manifest = finish_manifest(job, root) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    manifest = manifest or read_manifest(root)
    accelerator.print(saved_line(manifest))
    return {
        **manifest,
        "seconds": round(seconds, 3),
        "computed_positions": sum(per_rank),
        "per_rank": per_rank,
    }
