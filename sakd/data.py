"""Data: text through `datasets`, tokenization, packing into blocks, the held-out split, batch order.

The batch order is a pure function of (seed, epoch, optimizer step): optimizer step ``s`` consumes
the global slice ``order[s*G:(s+1)*G]`` with ``G = micro_batch * accumulation * world_size``, and
micro-batch ``m`` of rank ``r`` takes ``b`` consecutive blocks of it.  So the blocks of one
optimizer step do not depend on how they are split into micro-batches or ranks (1x8 == 4x2 ==
2 ranks x 4), and a resumed run continues from exactly the next block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from sakd.config import DataConfig

LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data problem a user can fix; one line."""


def load_text_dataset(
    spec: str, *, split: str = "train", text_field: str = "text", dataset_config: str | None = None
) -> datasets.Dataset:
    """A `datasets.Dataset` with one ``text`` column, from a local file or a hub dataset name."""
    path = Path(spec).expanduser()
    if path.suffix in LOCAL_BUILDERS or path.exists() or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise DataError(f"data file not found: {spec}")
        if path.is_dir():
            raise DataError(f"data path is a directory; give a .txt, .jsonl or .parquet file: {spec}")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"unsupported data file type '{path.suffix}' ({spec}); use .txt, .jsonl or .parquet"
            )
        try:
            with path.open("rb") as fh:
                fh.read(1)
        except OSError as e:
            raise DataError(f"cannot read data file {spec}: {e.strerror}") from None
        if path.stat().st_size == 0:
            raise DataError(f"data file is empty: {spec}")
        try:
            ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise DataError(f"cannot parse data file {spec} as {builder}: {str(e).splitlines()[0]}") from None
    else:
        try:
            ds = datasets.load_dataset(spec, dataset_config, split=split)
        except Exception as e:
            raise DataError(f"cannot load dataset '{spec}': {str(e).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {spec} has no column '{text_field}' (columns: {', '.join(ds.column_names)}); set data.text_field"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds.filter(lambda t: bool(t and t.strip()), input_columns="text")


def pack(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int) -> datasets.Dataset:
    """Tokenize documents (EOS after each), concatenate, cut into ``block_size`` blocks (remainder dropped)."""
    eos = tokenizer.eos_token_id

    def tokenize_and_group(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids: list[int] = []
        for seq in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            if eos is not None:
                ids.append(eos)
        n = len(ids) // block_size
        return {"input_ids": [ids[i * block_size : (i + 1) * block_size] for i in range(n)]}

    return ds.map(tokenize_and_group, batched=True, batch_size=2000, remove_columns=ds.column_names)


@dataclass
class DataBundle:
    """Packed train and held-out blocks (``input_ids`` columns, torch format)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    block_size: int

    def train_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return make_batch(self.train[indices]["input_ids"], indices)


def make_batch(input_ids: torch.Tensor, sample_ids: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """A model batch from packed blocks; labels equal inputs (the loss shifts them)."""
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "sample_ids": torch.as_tensor(sample_ids, dtype=torch.long),
    }


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> DataBundle:
    """Load, split (by document), tokenize and pack the corpus described by ``cfg``."""
    if not cfg.train:
        raise DataError("no training data: set data.train to a .txt/.jsonl/.parquet file or a dataset name")
    docs = load_text_dataset(
        cfg.train, split=cfg.split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
    )
    if len(docs) == 0:
        raise DataError(f"data {cfg.train} holds no non-empty documents")
    if cfg.eval:
        train_docs = docs
        eval_docs = load_text_dataset(
            cfg.eval, split=cfg.eval_split, text_field=cfg.text_field, dataset_config=cfg.dataset_config
        )
    else:
        if len(docs) < 2:
            raise DataError(
                f"data {cfg.train} has 1 document; a held-out split needs more (or set data.eval)"
            )
        split = docs.train_test_split(test_size=cfg.eval_fraction, seed=seed, shuffle=True)
        train_docs, eval_docs = split["train"], split["test"]
    train = pack(train_docs, tokenizer, cfg.block_size)
    evalset = pack(eval_docs, tokenizer, cfg.block_size)
    for name, blocks in (("training", train), ("held-out", evalset)):
        if len(blocks) == 0:
            raise DataError(
                f"{name} text of {cfg.train if name == 'training' else (cfg.eval or cfg.train)} is shorter than one "
                f"block of {cfg.block_size} tokens; add text or lower data.block_size"
            )
    if cfg.max_train_blocks:
        train = train.select(range(min(cfg.max_train_blocks, len(train))))
    if cfg.max_eval_blocks:
        evalset = evalset.select(range(min(cfg.max_eval_blocks, len(evalset))))
    return DataBundle(train.with_format("torch"), evalset.with_format("torch"), cfg.block_size)


@functools.lru_cache(maxsize=2)
def _epoch_order(num_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    """The block order of one epoch (cached: it is asked for at every optimizer step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_blocks, generator=g)


@dataclass(frozen=True)
class BatchPlan:
    """Which blocks each rank reads at each optimizer step (see the module docstring)."""

    num_blocks: int
    micro_batch: int
    accumulation: int
    world_size: int
    seed: int

    @property
    def blocks_per_step(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_blocks // self.blocks_per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return _epoch_order(self.num_blocks, self.seed, epoch)

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """The ``accumulation`` micro-batches (block indices) of one optimizer step on ``rank``."""
        order = self.epoch_order(epoch)
        start = step_in_epoch * self.blocks_per_step
        out = []
        for m in range(self.accumulation):
            lo = start + (m * self.world_size + rank) * self.micro_batch
            out.append(order[lo : lo + self.micro_batch].tolist())
        return out
