"""Shared fixtures: a small generated corpus and a byte-level BPE tokenizer trained on it (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One intra-op thread in the test process, as in every worker process the tests start: several tests
# compare a run in this process bitwise with one in a worker (resume, 2 ranks vs 1 process) or the same
# block computed inside different micro-batches, and CPU kernels round differently in the last bits with
# another thread count (seen with 2 threads: 1e-7 differences). A fixed count keeps those comparisons exact.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sakd.data.synthetic import write_corpus

    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", num_docs=400, seed=3)


@pytest.fixture(scope="session")
def tokenizer_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sakd.commands.demo import train_tokenizer

    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer", 384)


@pytest.fixture()
def tiny_run_config(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> dict:
    """A few-step recipe on tiny models; tests override what they exercise."""
    return _tiny_recipe(corpus, tokenizer_dir, tmp_path)


@pytest.fixture(scope="module")
def tiny_run_config_module(
    corpus: Path, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """:func:`tiny_run_config` for module-scoped fixtures (set training.output_dir yourself)."""
    return _tiny_recipe(corpus, tokenizer_dir, tmp_path_factory.mktemp("tiny"))


def _tiny_recipe(corpus: Path, tokenizer_dir: Path, tmp_path: Path) -> dict:
    return {
        "model": {"teacher": "tiny-moe", "student": "tiny-dense", "tokenizer": str(tokenizer_dir)},
        # the generated corpus holds one document per line
        "data": {"train": str(corpus), "sample_by": "line", "block_size": 32, "max_eval_blocks": 8},
        "distillation": {"loss": {"alpha": 0.5, "temperature": 2.0, "chunk_size": 40}},
        "optimization": {"learning_rate": 1e-3, "warmup_steps": 1},
        "training": {
            "output_dir": str(tmp_path / "run"),
            "batch_size": 4,
            "max_steps": 4,
            "eval_every": 0,
            "seed": 0,
        },
        "logging": {"log_every": 1, "progress_bar": False},
    }


@pytest.fixture()
def make_distiller():
    """Build a :class:`Distiller` from a recipe dict with ``training.*`` overrides (fresh run)."""
    import copy

    from sakd.config import load_config
    from sakd.training.trainer import Distiller

    def build(raw: dict, **training) -> Distiller:
        raw = copy.deepcopy(raw)
        raw["training"].update(training)
        cfg, _ = load_config(raw)
        return Distiller(cfg, resume="none", overwrite=True)

    return build


@pytest.fixture(scope="session")
def permuted_tokenizer_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`tokenizer_dir` with the ids of its non-special tokens reversed: it cuts every text exactly as
    the original does (same strings, same merges), but its vocabulary differs -- a second tokenizer whose
    cross-tokenizer alignment is the identity, so cross-tokenizer results can be compared exactly."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("permuted") / "tokenizer"
    shutil.copytree(tokenizer_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    specials = {t["id"] for t in spec["added_tokens"]}
    others = sorted(set(spec["model"]["vocab"].values()) - specials)
    new_id = dict(zip(others, reversed(others), strict=True))
    spec["model"]["vocab"] = {tok: new_id.get(i, i) for tok, i in spec["model"]["vocab"].items()}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out
