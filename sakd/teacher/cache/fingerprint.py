"""What a cache is keyed to, computed the same way when it is written and when a run reads it: the
teacher (its source, the SHA-256 of its config, the seed of a random-init preset), the teacher's
tokenizer (the SHA-256 of its whole definition: vocabulary, merges, normalizer, pre-tokenizer, special
tokens) and the training documents (their count and the SHA-256 of their text, in order) with the data
settings that chose them. No weights are read: the training side must not load the teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sakd.config import DataConfig, ModelConfig
from sakd.models import is_preset, preset_config_for
from sakd.models.loading import default_tokenizer_spec

_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def teacher_tokenizer_spec(mcfg: ModelConfig) -> str | None:
    """Where the teacher's tokenizer comes from (as in a run): model.teacher_tokenizer, the teacher's own
    directory, else the student's tokenizer (a preset teacher shares it)."""
    return default_tokenizer_spec(mcfg.teacher, mcfg.teacher_tokenizer) or default_tokenizer_spec(
        mcfg.student, mcfg.tokenizer
    )


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's definition (fast tokenizers: the whole ``tokenizer.json`` minus its runtime
    padding/truncation settings; others: the sorted vocabulary) and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return _sha(json.dumps({"tokenizer": spec, "eos": tokenizer.eos_token_id}, sort_keys=True))


def _config_sha256(config: dict[str, Any]) -> str:
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    return _sha(json.dumps(config, sort_keys=True))


def teacher_identity(mcfg: ModelConfig, tokenizer: Any, *, seed: int) -> dict[str, Any]:
    """The teacher a cache was (or would be) written by, without loading its weights.

    ``seed`` is the seed a preset teacher is initialised with (a run uses ``training.seed + 1``); it is
    recorded for presets only -- a real teacher does not depend on it.
    """
    spec = mcfg.teacher
    if is_preset(spec):
        config = preset_config_for(spec, tokenizer).to_dict()
        return {"source": spec, "config_sha256": _config_sha256(config), "preset_seed": seed}
    path = Path(spec).expanduser()
    if path.is_dir():
        config = json.loads((path / "config.json").read_text())
        return {"source": str(path.resolve()), "config_sha256": _config_sha256(config), "preset_seed": None}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec, trust_remote_code=mcfg.trust_remote_code).to_dict()
    return {"source": spec, "config_sha256": _config_sha256(config), "preset_seed": None}


def documents_fingerprint(docs: Any) -> dict[str, Any]:
    """Count and SHA-256 of the documents' text, in order (each document's UTF-8 bytes, then a NUL)."""
    h = hashlib.sha256()
    count = 0
    column = "text" if "text" in docs.column_names else "messages"  # conversations: their messages as JSON
    for batch in docs.iter(batch_size=10_000):
        for doc in batch[column]:
            text = doc if column == "text" else json.dumps(doc, sort_keys=True, ensure_ascii=False)
            h.update(text.encode())
            h.update(b"\0")
            count += 1
    return {"documents": count, "documents_sha256": h.hexdigest()}


def layout_settings(dcfg: DataConfig, teacher_tokenizer: Any) -> dict[str, Any]:
    """What the cached positions depend on besides the documents: the packing (``within_document``: the
    teacher saw each document alone) and, for conversations, the teacher's chat template and ``loss_on``
    (which positions carry KD, so which are stored). Text caches of older versions lack these keys: they
    were made ``cross_document`` from text."""
    out: dict[str, Any] = {"format": dcfg.format, "packing": dcfg.resolved_packing()}
    if dcfg.format == "chat":
        template = str(getattr(teacher_tokenizer, "chat_template", None))
        out.update(loss_on=dcfg.loss_on, chat_template_sha256=_sha(template))
    return out


def data_settings(dcfg: DataConfig, split_seed: int) -> dict[str, Any]:
    """The data settings that pick the training documents (reported when the documents differ)."""
    return {
        "train": dcfg.train,
        "dataset_config": dcfg.dataset_config,
        "split": dcfg.split,
        "text_field": dcfg.text_field,
        "messages_field": dcfg.messages_field if dcfg.format == "chat" else None,
        "eval": dcfg.eval,
        "eval_fraction": None if dcfg.eval else dcfg.eval_fraction,
        "split_seed": None if dcfg.eval else split_seed,
    }
