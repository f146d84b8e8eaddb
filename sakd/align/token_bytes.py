"""Every token reduced to the bytes it contributes to decoded text, whatever the tokenizer family's spelling
conventions: the byte-level BPE alphabet of GPT-2 (``Ġ`` = space, ``Ċ`` = newline, one character per byte),
sentencepiece's ``▁`` word marker and ``<0xNN>`` byte-fallback pieces, WordPiece's ``##`` continuation
prefix. :mod:`sakd.align.vocab` pairs two tokenizers' tokens by these bytes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


_METASPACE = "\u2581"


SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def _byte_translation() -> dict[int, str]:
    """``str.translate`` table: a byte-level character -> the latin-1 character of its byte; any
    other character up to U+0143 -> U+FFFF, which (like anything above) fails latin-1 encoding."""
    table = {ord(ch): chr(b) for ch, b in _byte_decoder().items()}
    return {c: table.get(c, "\uffff") for c in range(max(table) + 1)}


def _component_configs(component: Any) -> list[dict]:
    """All nested config dicts (with a ``type``) of a tokenizers normalizer/pre-tokenizer/decoder."""
    if component is None:
        return []
    try:
        state = json.loads(component.__getstate__())
    except Exception:
        return []
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "type" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(state)
    return found


@dataclass(frozen=True)
class _Scheme:
    """How a tokenizer spells bytes in its vocabulary."""

    byte_level: bool
    byte_fallback: bool
    metaspace: str | None
    continuing_prefix: str | None
    end_suffix: str | None
    detected: bool  # from the backend (True) or guessed from the vocabulary (False)

    def describe(self) -> str:
        return json.dumps(
            [self.byte_level, self.byte_fallback, self.metaspace, self.continuing_prefix, self.end_suffix]
        )


def _scheme_from_backend(backend: Any) -> _Scheme:
    configs = {
        name: _component_configs(getattr(backend, name, None))
        for name in ("normalizer", "pre_tokenizer", "decoder")
    }
    types = {name: {c["type"] for c in cs} for name, cs in configs.items()}
    all_types = set().union(*types.values())
    byte_level = "ByteLevel" in types["pre_tokenizer"] or "ByteLevel" in types["decoder"]
    model = backend.model
    model_type = type(model).__name__
    byte_fallback = bool(getattr(model, "byte_fallback", False)) or "ByteFallback" in all_types
    if not byte_fallback and model_type == "Unigram" and not byte_level:
        try:
            byte_fallback = bool(json.loads(model.__getstate__()).get("byte_fallback", False))
        except Exception:
            byte_fallback = False
    metaspace = None
    for cs in configs.values():
        for c in cs:
            if c["type"] == "Metaspace":
                metaspace = c.get("replacement", _METASPACE)
    if metaspace is None and not byte_level:
        metaspace = _METASPACE  # a Replace('▁', ' ') decoder or normalizer, or harmless otherwise
    prefix = getattr(model, "continuing_subword_prefix", None) or None
    suffix = getattr(model, "end_of_word_suffix", None) or None
    return _Scheme(byte_level, byte_fallback, metaspace, prefix, suffix, detected=True)


def _scheme_from_vocab(tokens: list[str | None]) -> _Scheme:
    present = [t for t in tokens if t]
    byte_chars = _byte_decoder()
    gpt2 = sum(t[0] in ("Ġ", "Ċ") for t in present)
    spm = sum(t[0] == _METASPACE for t in present)
    byte_level = gpt2 > spm and all(ch in byte_chars for t in present[:1000] for ch in t[:1])
    byte_fallback = not byte_level and any(_BYTE_FALLBACK.fullmatch(t) for t in present)
    wordpiece = not byte_level and sum(t.startswith("##") for t in present) > 0.01 * max(len(present), 1)
    return _Scheme(
        byte_level,
        byte_fallback,
        None if byte_level else _METASPACE,
        "##" if wordpiece else None,
        None,
        detected=False,
    )


@dataclass(frozen=True)
class TokenTable:
    """Everything about one tokenizer that the alignment needs, computed once."""

    tokens: list[str | None]  # id -> token string (None for a hole)
    special_ids: frozenset[int]
    role_ids: dict[str, int]  # eos/bos/pad/unk -> id, where defined
    scheme: _Scheme
    data: list[bytes | None]  # id -> bytes (None: special or unrepresentable)
    fallback: list[bool]  # id -> is a '<0xNN>' byte-fallback piece

    def fingerprint(self) -> bytes:
        payload = {
            "tokens": self.tokens,
            "special": sorted(self.special_ids),
            "roles": self.role_ids,
            "scheme": self.scheme.describe(),
        }
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def token_table(tokenizer: Any) -> TokenTable:
    n = len(tokenizer)
    tokens: list[str | None] = [None] * n
    for tok, idx in tokenizer.get_vocab().items():
        if 0 <= idx < n:
            tokens[idx] = tok
    special = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    added = dict(getattr(tokenizer, "added_tokens_decoder", None) or {})
    special |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    special = {i for i in special if 0 <= i < n}
    roles = {}
    for role in SPECIAL_ROLES:
        idx = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(idx, int) and 0 <= idx < n:
            roles[role] = idx
    backend = getattr(tokenizer, "backend_tokenizer", None)
    scheme = _scheme_from_backend(backend) if backend is not None else _scheme_from_vocab(tokens)
    model = backend.model if backend is not None else None

    translation = _byte_translation()
    data: list[bytes | None] = [None] * n
    fallback = [False] * n
    for idx, tok in enumerate(tokens):
        if tok is None or idx in special:
            continue
        if idx in added and (model is None or model.token_to_id(tok) != idx):
            data[idx] = tok.encode("utf-8")  # an added token is matched as raw text
            continue
        if scheme.byte_level:
            try:
                data[idx] = tok.translate(translation).encode("latin-1")
            except UnicodeEncodeError:
                data[idx] = None
            continue
        if scheme.byte_fallback:
            m = _BYTE_FALLBACK.fullmatch(tok)
            if m is not None:
                data[idx] = bytes([int(m.group(1), 16)])
                fallback[idx] = True
                continue
        text = tok
        prefix = scheme.continuing_prefix
        if prefix and text.startswith(prefix) and len(text) > len(prefix):
            text = text[len(prefix) :]
        suffix = scheme.end_suffix
        if suffix and text.endswith(suffix) and len(text) > len(suffix):
            text = text[: -len(suffix)] + " "
        if scheme.metaspace:
            text = text.replace(scheme.metaspace, " ")
        data[idx] = text.encode("utf-8")
    return TokenTable(tokens, frozenset(special), roles, scheme, data, fallback)


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id in ``range(len(tokenizer))`` contributes to decoded text.

    Byte-level BPE is detected from the backend (a ``ByteLevel`` pre-tokenizer or decoder) and its
    characters are mapped back through GPT-2's byte table; otherwise ``<0xNN>`` pieces are single
    bytes when the model uses byte fallback, sentencepiece's ``▁`` is a space, WordPiece's ``##``
    prefix is dropped and the rest is UTF-8 text. Special tokens, holes in the id space and
    byte-level tokens outside the byte alphabet are ``None``. Without a ``tokenizers`` backend the
    scheme is guessed from the vocabulary.
    """
    return list(token_table(tokenizer).data)
