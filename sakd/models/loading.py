"""Loading teachers, students and tokenizers: presets, local directories, GGUF files, hub ids."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from sakd.errors import SetupError
from sakd.models.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer
from sakd.models.presets import is_preset, preset_config_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(SetupError):
    """A model or tokenizer could not be loaded; the message says what and how to fix it."""


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).expanduser().exists()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a directory or hub id and make sure it can pad.

    A tokenizer without a pad token gets its EOS token as pad (the usual causal-LM choice; padded
    positions are excluded from every loss by the attention mask and ``-100`` labels).
    """
    if is_gguf(spec):
        tok = load_gguf_tokenizer(spec)
    elif _looks_local(spec) and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(f"tokenizer directory not found: {spec}")
    else:
        tok = _pretrained_tokenizer(spec, trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(
                f"tokenizer '{spec}' has neither a pad nor an EOS token; add one (tokenizer.add_special_tokens) and save it"
            )
        tok.pad_token = tok.eos_token
        log.info("tokenizer %s has no pad token: using its EOS token %r", spec, tok.eos_token)
    return tok


def _pretrained_tokenizer(spec: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(
            str(Path(spec).expanduser()) if _looks_local(spec) else spec, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load tokenizer '{spec}': {_first_line(e)} (give a local directory with tokenizer files)"
        ) from None


def load_model(
    spec: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    seed: int = 0,
    attn_implementation: str | None = None,
    quantization: str = "none",
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """A causal LM from a preset name (random init, seeded), a local directory, a ``.gguf`` file or a hub id.

    ``quantization`` (8bit / 4bit) loads it through bitsandbytes onto ``device`` (CUDA only): a frozen
    teacher at a half / a quarter of its fp16 memory.
    """
    kwargs = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization != "none":
        return _load_quantized(spec, tokenizer, dtype, trust_remote_code, seed, kwargs, quantization, device)
    if is_preset(spec):
        if tokenizer is None:
            raise ModelLoadError(f"model preset '{spec}' needs a tokenizer (set model.tokenizer)")
        config = preset_config_for(spec, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    if is_gguf(spec):  # dequantized into a plain model (see sakd.models.gguf)
        return load_gguf_model(spec, dtype=DTYPES[dtype], attn_implementation=attn_implementation)
    if _looks_local(spec) and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(
            f"model directory not found: {spec} (nor is it a preset: see `sakd distill --help`)"
        )
    source = str(Path(spec).expanduser()) if _looks_local(spec) else spec
    try:
        return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model '{spec}': {_first_line(e)}") from None


def _load_quantized(spec, tokenizer, dtype, trust_remote_code, seed, kwargs, quantization, device):
    """bitsandbytes quantizes while ``from_pretrained`` loads; a preset is saved to a temporary directory
    first so it goes through the same path as a real checkpoint."""
    import tempfile

    from transformers import BitsAndBytesConfig

    if torch.device(device or "cpu").type != "cuda":
        raise ModelLoadError(
            f"model.teacher_quantization={quantization} needs a CUDA GPU (bitsandbytes); use none on this machine"
        )
    if quantization == "8bit":
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype]
        )
    kwargs = {**kwargs, "quantization_config": q, "device_map": {"": torch.device(device).index or 0}}
    if not is_preset(spec) and not is_gguf(spec):
        source = str(Path(spec).expanduser()) if _looks_local(spec) else spec
        try:
            return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model '{spec}': {_first_line(e)}") from None
    model = load_model(spec, tokenizer=tokenizer, dtype=dtype, trust_remote_code=trust_remote_code, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=trust_remote_code, **kwargs)


def check_model_source(spec: str, role: str) -> None:
    """Fail early, naming the role, when a model that should be a local directory is missing."""
    if is_gguf(spec):
        if not Path(spec).expanduser().is_file():
            raise ModelLoadError(f"{role} GGUF file not found: {spec}")
    elif not is_preset(spec) and _looks_local(spec) and not Path(spec).expanduser().is_dir():
        raise ModelLoadError(f"{role} model directory not found: {spec} (nor is it a preset name)")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze a teacher: no gradients, eval mode (dropout off). Callers run it under no_grad."""
    model.requires_grad_(False)
    model.eval()
    return model


def default_tokenizer_spec(model_spec: str, explicit: str | None) -> str | None:
    """Where a model's tokenizer comes from: the explicit setting, else the model's own directory/id."""
    if explicit:
        return explicit
    return None if is_preset(model_spec) else model_spec
