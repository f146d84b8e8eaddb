"""Reading a recipe: YAML/JSON file or dict, ``dotted.key=value`` overrides, the old system's flat
keys, type coercion, range checks and cross-field validation -- every problem one line naming the key
(unknown keys with the nearest valid name) -- and writing the resolved config.

The old system's flat ``configs/improved_config.json`` keys are accepted through
:mod:`sakd.config.legacy_keys`; keys it had that sakd does not implement are *reported*, never
silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sakd.config.data_schema import check_chat
from sakd.config.generation import check_generation
from sakd.config.legacy_keys import SEED_EXTRA_KEYS, SEED_KEY_MAP, SEED_KEYS_NOT_YET_SUPPORTED, seed_key_value
from sakd.config.schema import SECTIONS, RunConfig, all_keys, field_types, is_dataclass_type
from sakd.errors import ConfigError


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if not close:
        # Try matching on the last component only (e.g. "learning_rate" -> "optimization.learning_rate").
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close_tail = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[close_tail[0]]] if close_tail else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _candidates(prefix: str) -> list[str]:
    """Names a misspelt key may have meant: sections and seed keys at the top level, leaves below."""
    if prefix:
        return all_keys()
    return SECTIONS + all_keys() + sorted(set(SEED_KEY_MAP) | SEED_EXTRA_KEYS)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        _, value_type = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        if is_dataclass_type(item_type):  # a list of sections (optimization.stages)
            return [_build(item_type, v, f"{key}[{i}].") for i, v in enumerate(value)]
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        for tp_arg in args[:-1]:  # e.g. int | str: a number, else the word (checked by validate)
            try:
                return _coerce(key, value, tp_arg)
            except ConfigError:
                continue
        return _coerce(key, value, args[-1])
    if value is None:
        raise ConfigError(f"config key '{key}' may not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _unyaml_choice(value: Any, choices: list[Any] | None) -> Any:
    """YAML 1.1 reads no/off/false (yes/on/true) as booleans: ``mixed_precision: no`` arrives as False.
    For a field whose choices are words, take the bool back to the word it was written as."""
    if not isinstance(value, bool) or not choices or not all(isinstance(c, str) for c in choices):
        return value
    words = ("no", "off", "false", "none") if value is False else ("yes", "on", "true")
    return next((w for w in words if w in choices), value)


def _check_range(key: str, value: Any, meta: dict[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            + _suggest(str(value), [str(c) for c in choices])
        )
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"config key '{key}' must be >= {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"config key '{key}' must be <= {meta['max']}, got {value!r}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"config key '{key}' must be > {meta['gt']}, got {value!r}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigError(f"config key '{key}' must be < {meta['lt']}, got {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {raw!r}")
    hints = field_types(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(f"unknown config key '{full}'" + _suggest(full, _candidates(prefix)))
    kwargs = {}
    for name, f in names.items():
        if name not in raw:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if is_dataclass_type(tp):
            kwargs[name] = _build(tp, raw[name], key + ".")
        else:
            value = _coerce(key, _unyaml_choice(raw[name], f.metadata.get("choices")), tp)
            _check_range(key, value, dict(f.metadata))
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{key}': '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _translate_seed_keys(raw: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """Move the old system's flat keys into the tree; report the ones not supported yet."""
    out: dict[str, Any] = {k: v for k, v in raw.items() if k in SECTIONS}
    for key, value in raw.items():
        if key in SECTIONS:
            continue
        if key in SEED_KEY_MAP or key in SEED_EXTRA_KEYS:
            for dotted, v in seed_key_value(key, value):
                _set_dotted(out, dotted, v)
        elif key in SEED_KEYS_NOT_YET_SUPPORTED:
            notes.append(
                f"seed key '{key}' is not supported yet: {SEED_KEYS_NOT_YET_SUPPORTED[key]} (ignored)"
            )
        else:
            out[key] = value  # left for _build to reject with a suggestion
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``dotted.key=value`` override; the value is read as YAML (1e-4, true, null, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. training.max_steps=100)")
    key, _, value = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key, parsed


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON recipe into a dict, with a one-line error for unreadable/invalid files."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    if p.is_dir():
        raise ConfigError(f"config path is a directory, not a YAML/JSON file: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> tuple[RunConfig, list[str]]:
    """Build a validated :class:`RunConfig` from a file or dict plus ``key=value`` overrides.

    Returns the config and a list of notes (seed keys reported as not supported yet).
    """
    notes: list[str] = []
    raw = {} if source is None else (dict(source) if isinstance(source, dict) else read_config_file(source))
    raw = _translate_seed_keys(raw, notes)
    for item in overrides or []:
        key, value = parse_override(item)
        if "." not in key and (
            key in SEED_KEY_MAP or key in SEED_EXTRA_KEYS or key in SEED_KEYS_NOT_YET_SUPPORTED
        ):
            raw = _translate_seed_keys({**raw, key: value}, notes)
            continue
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"unknown config key '{key}'" + _suggest(key, _candidates("")))
        _set_dotted(raw, key, value)
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg, notes


def _check_rules(key: str, rules: dict[str, float]) -> None:
    for pattern, mult in rules.items():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key}: bad regex {pattern!r} ({e})") from None
        if mult < 0:
            raise ConfigError(f"{key}[{pattern!r}] must be >= 0 (0 freezes), got {mult}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that single-field ranges cannot express."""
    loss = cfg.distillation.loss
    _check_rules("optimization.lr_multipliers", cfg.optimization.lr_multipliers)
    for i, stage in enumerate(cfg.optimization.stages):
        if stage.steps is None and stage.epochs is None:
            raise ConfigError(f"optimization.stages[{i}] needs steps or epochs")
        _check_rules(f"optimization.stages[{i}].lr_multipliers", stage.lr_multipliers or {})
    if loss.chunk_size != "auto" and (not isinstance(loss.chunk_size, int) or loss.chunk_size < 1):
        raise ConfigError(
            f"distillation.loss.chunk_size must be auto or an integer >= 1, got {loss.chunk_size!r}"
        )
    if (
        loss.sparse in ("subset", "topk_tail")
        and loss.kd_top_k is None
        and not cfg.distillation.teacher_cache
    ):
        raise ConfigError(
            f"distillation.loss.sparse={loss.sparse} needs distillation.loss.kd_top_k (e.g. 256) "
            "or a distillation.teacher_cache (whose k it then uses)"
        )
    if cfg.training.early_stopping_patience and not cfg.training.eval_every:
        raise ConfigError(
            "training.early_stopping_patience needs training.eval_every > 0 (evaluations to compare)"
        )
    if loss.temperature_schedule != "constant" and loss.min_temperature is None:
        raise ConfigError(
            "distillation.loss.temperature_schedule needs distillation.loss.min_temperature (the final temperature)"
        )
    if cfg.data.eval_stride is not None and cfg.data.eval_stride > cfg.data.block_size:
        raise ConfigError(
            f"data.eval_stride={cfg.data.eval_stride} is larger than data.block_size={cfg.data.block_size}: "
            "tokens between windows would never be scored; lower it"
        )
    _validate_student_aware(cfg)
    check_chat(cfg)  # data.format=chat: what it does not support yet (config/data_schema.py)
    check_generation(cfg.distillation.policy, cfg.distillation.generation, cfg.data.block_size)
    if cfg.distillation.contrastive.weight > 0 and cfg.training.batch_size < 2:
        raise ConfigError(
            "distillation.contrastive needs training.batch_size >= 2: its negatives are the other sequences "
            "of each micro-batch (a batch of one has none and the term would silently be 0)"
        )


def _validate_student_aware(cfg: RunConfig) -> None:
    """The MoE signals, the token router and the curriculum: what they need from the rest of the config. What
    they need from the teacher signal (a live model, its router) is checked against its capabilities when the
    run is built (:mod:`sakd.objective.compose`)."""
    d = cfg.distillation
    moe, router, cur = d.moe, d.router, d.curriculum
    needs_kd = [
        (moe.augment_samples > 0, "distillation.moe.augment_samples"),
        (moe.student_aware_router, "distillation.moe.student_aware_router"),
        (router.enabled, "distillation.router.enabled"),
    ]
    for on, key in needs_kd:
        if on and d.loss.alpha == 0:
            raise ConfigError(f"{key} acts on the KD term: it needs distillation.loss.alpha > 0")
    if moe.augment_samples > 0 and moe.student_aware_router:
        raise ConfigError(
            "distillation.moe.augment_samples and student_aware_router exclude each other (the router uses "
            "every expert; the paper never combines them): turn one off"
        )
    if moe.augment_samples > 0 and d.loss.kind not in ("fkl", "rkl"):
        raise ConfigError(
            f"distillation.moe.augment_samples needs distillation.loss.kind fkl or rkl (got {d.loss.kind}): "
            "only for these is one KD term against the combined teacher the mean of the M KD terms"
        )
    if router.sharpen_end < router.sharpen_start:
        raise ConfigError("distillation.router.sharpen_end must be >= distillation.router.sharpen_start")
    if cur.all_start < cur.structure_start:
        raise ConfigError(
            "distillation.curriculum.all_start must be >= distillation.curriculum.structure_start"
        )


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
