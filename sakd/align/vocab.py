"""Vocabulary alignment between a student and a teacher tokenizer, by token bytes.

Every token is reduced to the bytes it contributes to decoded text (:func:`token_bytes`), which
removes the spelling conventions of the tokenizer family: the byte-level BPE alphabet of GPT-2
(``Ġ`` = space, ``Ċ`` = newline, one character per byte), sentencepiece's ``▁`` word marker and
``<0xNN>`` byte-fallback pieces, WordPiece's ``##`` continuation prefix. Tokens with equal bytes
are then paired (:func:`build_vocab_map`) into a :class:`VocabMap` whose ``student_to_teacher``
tensor is the map consumed by :mod:`sakd.losses.vocab_map`. Special tokens are paired by role
(eos/bos/pad/unk) and otherwise by identical string. :func:`load_or_build_vocab_map` caches the
map per tokenizer pair as a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sakd.losses.vocab_map import check_vocab_map

__all__ = ["VocabMap", "build_vocab_map", "load_or_build_vocab_map", "token_bytes"]

_FORMAT_VERSION = "1"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_METASPACE = "\u2581"
_SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


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
class _Table:
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


def _table(tokenizer: Any) -> _Table:
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
    for role in _SPECIAL_ROLES:
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
    return _Table(tokens, frozenset(special), roles, scheme, data, fallback)


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id in ``range(len(tokenizer))`` contributes to decoded text.

    Byte-level BPE is detected from the backend (a ``ByteLevel`` pre-tokenizer or decoder) and its
    characters are mapped back through GPT-2's byte table; otherwise ``<0xNN>`` pieces are single
    bytes when the model uses byte fallback, sentencepiece's ``▁`` is a space, WordPiece's ``##``
    prefix is dropped and the rest is UTF-8 text. Special tokens, holes in the id space and
    byte-level tokens outside the byte alphabet are ``None``. Without a ``tokenizers`` backend the
    scheme is guessed from the vocabulary.
    """
    return list(_table(tokenizer).data)


@dataclass(frozen=True)
class VocabMap:
    """A one-to-one partial map between student and teacher token ids."""

    student_to_teacher: Tensor  # int64 [Vs]: teacher id or -1
    teacher_to_student: Tensor  # int64 [Vt]: student id or -1
    student_vocab: int
    teacher_vocab: int

    @property
    def num_mapped(self) -> int:
        return int((self.student_to_teacher >= 0).sum())

    @property
    def student_coverage(self) -> float:
        """Share of student ids that have a teacher id."""
        return self.num_mapped / self.student_vocab if self.student_vocab else 0.0

    def teacher_mass_mapped(self, teacher_logprobs: Tensor) -> Tensor:
        """Mean over rows of the teacher probability on mapped teacher ids (a 0-dim float32 tensor).

        ``teacher_logprobs`` is ``[..., Vt]`` normalized log-probs, e.g. one ``[N, Vt]`` chunk.
        """
        if teacher_logprobs.shape[-1] != self.teacher_vocab:
            raise ValueError(
                f"teacher_logprobs has {teacher_logprobs.shape[-1]} ids, the map {self.teacher_vocab}"
            )
        ids = (self.teacher_to_student >= 0).nonzero().squeeze(-1).to(teacher_logprobs.device)
        rows = teacher_logprobs.reshape(-1, self.teacher_vocab)
        if ids.numel() == 0 or rows.shape[0] == 0:
            return torch.zeros((), dtype=torch.float32, device=teacher_logprobs.device)
        picked = rows.index_select(-1, ids).float()
        return torch.logsumexp(picked, dim=-1).exp().mean()

    def is_identity(self) -> bool:
        return self.student_vocab == self.teacher_vocab and bool(
            torch.equal(self.student_to_teacher, torch.arange(self.student_vocab, dtype=torch.int64))
        )

    def stats(self) -> dict:
        mapped = self.num_mapped
        return {
            "student_vocab": self.student_vocab,
            "teacher_vocab": self.teacher_vocab,
            "mapped": mapped,
            "student_coverage": self.student_coverage,
            "teacher_vocab_coverage": mapped / self.teacher_vocab if self.teacher_vocab else 0.0,
        }

    def validate(self) -> None:
        """Raise ``ValueError`` unless the two directions are valid and inverse to each other."""
        check_vocab_map(self.student_to_teacher, self.student_vocab, self.teacher_vocab)
        check_vocab_map(self.teacher_to_student, self.teacher_vocab, self.student_vocab)
        if self.student_to_teacher.dtype != torch.int64 or self.teacher_to_student.dtype != torch.int64:
            raise ValueError("vocab map tensors must be int64")
        inverse = torch.full((self.teacher_vocab,), -1, dtype=torch.int64)
        s = (self.student_to_teacher >= 0).nonzero().squeeze(-1)
        inverse[self.student_to_teacher[s]] = s
        if not torch.equal(inverse, self.teacher_to_student):
            raise ValueError("teacher_to_student is not the inverse of student_to_teacher")


def _from_pairs(pairs: dict[int, int], student_vocab: int, teacher_vocab: int) -> VocabMap:
    s2t = torch.full((student_vocab,), -1, dtype=torch.int64)
    t2s = torch.full((teacher_vocab,), -1, dtype=torch.int64)
    if pairs:
        s = torch.tensor(list(pairs.keys()), dtype=torch.int64)
        t = torch.tensor(list(pairs.values()), dtype=torch.int64)
        s2t[s] = t
        t2s[t] = s
    vmap = VocabMap(s2t, t2s, student_vocab, teacher_vocab)
    check_vocab_map(vmap.student_to_teacher, student_vocab, teacher_vocab)
    return vmap


def _build(student: _Table, teacher: _Table) -> VocabMap:
    vs, vt = len(student.tokens), len(teacher.tokens)
    if (
        student.tokens == teacher.tokens
        and student.special_ids == teacher.special_ids
        and student.scheme == teacher.scheme
    ):
        return _from_pairs(dict(zip(range(vs), range(vt), strict=True)), vs, vt)

    pairs: dict[int, int] = {}
    used: set[int] = set()

    def pair(s: int, t: int) -> None:
        if s not in pairs and t not in used:
            pairs[s] = t
            used.add(t)

    # Special tokens: by role first, then by identical string.
    for role in _SPECIAL_ROLES:
        if role in student.role_ids and role in teacher.role_ids:
            pair(student.role_ids[role], teacher.role_ids[role])
    teacher_special = {teacher.tokens[t]: t for t in sorted(teacher.special_ids, reverse=True)}
    for s in sorted(student.special_ids):
        t = teacher_special.get(student.tokens[s])
        if t is not None:
            pair(s, t)

    # Ordinary tokens: group ids by bytes on both sides, then pair each group in preference order
    # (real pieces before '<0xNN>' byte-fallback pieces, then by id).
    def groups(table: _Table) -> tuple[dict[bytes, int], dict[bytes, list[int]]]:
        first: dict[bytes, int] = {}  # bytes -> its lowest id
        shared: dict[bytes, list[int]] = {}  # bytes held by several ids -> all of them, preferred first
        for idx, b in enumerate(table.data):
            if b:
                prev = first.setdefault(b, idx)
                if prev != idx:
                    shared.setdefault(b, [prev]).append(idx)
        for ids in shared.values():
            ids.sort(key=lambda i: (table.fallback[i], i))
        return first, shared

    t_first, t_shared = groups(teacher)
    s_first, s_shared = groups(student)
    for b, s in s_first.items():
        t = t_first.get(b)
        if t is None:
            continue
        if b not in s_shared and b not in t_shared:
            pair(s, t)
            continue
        t_free = [t for t in t_shared.get(b, [t]) if t not in used]
        s_free = [s for s in s_shared.get(b, [s]) if s not in pairs]
        for s_id, t_id in zip(s_free, t_free, strict=False):
            pair(s_id, t_id)

    # Tokens without bytes (non-special but unrepresentable): by identical string.
    teacher_rest = {
        teacher.tokens[t]: t
        for t in range(vt - 1, -1, -1)
        if teacher.data[t] is None and teacher.tokens[t] is not None and t not in used
    }
    if teacher_rest:
        for s in range(vs):
            if student.data[s] is not None or s in pairs or s in student.special_ids:
                continue
            t = teacher_rest.get(student.tokens[s]) if student.tokens[s] is not None else None
            if t is not None and t not in teacher.special_ids:
                pair(s, t)
    return _from_pairs(pairs, vs, vt)


def build_vocab_map(student_tok: Any, teacher_tok: Any) -> VocabMap:
    """Pair student and teacher ids whose tokens decode to the same bytes (see :func:`token_bytes`).

    eos/bos/pad/unk are paired by role when both tokenizers define them, other special tokens by
    identical string. When one side has several ids with the same bytes (``A`` and the
    byte-fallback ``<0x41>``), the real piece is preferred; every teacher id is used at most once.
    Identical tokenizers give the identity map. Linear in the two vocabulary sizes.
    """
    return _build(_table(student_tok), _table(teacher_tok))


def _cache_key(student: _Table, teacher: _Table) -> str:
    h = hashlib.sha256()
    h.update(f"sakd-vocab-map-v{_FORMAT_VERSION}\0".encode())
    for table in (student, teacher):
        fp = table.fingerprint()
        h.update(len(fp).to_bytes(8, "little"))
        h.update(fp)
    return h.hexdigest()


def _load_cached(path: Path, key: str, vs: int, vt: int) -> VocabMap:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("key") != key:
        raise ValueError("cache key mismatch")
    vmap = VocabMap(tensors["student_to_teacher"], tensors["teacher_to_student"], vs, vt)
    vmap.validate()
    return vmap


def load_or_build_vocab_map(
    student_tok: Any, teacher_tok: Any, cache_dir: str | Path | None
) -> tuple[VocabMap, bool]:
    """:func:`build_vocab_map`, cached in ``<cache_dir>/vocab_map-<key16>.safetensors``.

    The key is a sha256 over both tokenizers' full id -> token tables, special ids and spelling
    scheme. Returns ``(map, loaded_from_cache)``. An unreadable or mismatched cache file is
    reported with a warning and rebuilt (overwritten atomically). ``cache_dir=None`` disables
    caching.
    """
    student, teacher = _table(student_tok), _table(teacher_tok)
    if cache_dir is None:
        return _build(student, teacher), False
    key = _cache_key(student, teacher)
    path = Path(cache_dir) / f"vocab_map-{key[:16]}.safetensors"
    vs, vt = len(student.tokens), len(teacher.tokens)
    if path.exists():
        try:
            return _load_cached(path, key, vs, vt), True
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            warnings.warn(f"vocab map cache {path} is unusable ({reason}); rebuilding it", stacklevel=2)
    vmap = _build(student, teacher)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {
                "student_to_teacher": vmap.student_to_teacher.contiguous(),
                "teacher_to_student": vmap.teacher_to_student.contiguous(),
            },
            str(tmp),
            metadata={"key": key, "student_vocab": str(vs), "teacher_vocab": str(vt)},
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return vmap, False


def first_piece_map(student_tok: Any, teacher_tok: Any, vmap: VocabMap | None = None) -> Tensor:
    """``[Vt]`` int64: for each teacher token, the longest student token whose bytes are a prefix of
    its bytes (the student token the text continues with), or -1 (special tokens, or no prefix).

    Exact matches (``vmap``) are kept as they are. This many-to-one map is what the cross-tokenizer
    KD projects the teacher through (:func:`sakd.losses.vocab_map.project_many_to_one`).
    """
    vmap = vmap or build_vocab_map(student_tok, teacher_tok)
    s_bytes = token_bytes(student_tok)
    t_bytes = token_bytes(teacher_tok)
    by_bytes: dict[bytes, int] = {}
    for i in range(len(s_bytes)):
        b = s_bytes[i]
        if b and b not in by_bytes:
            by_bytes[b] = i
    longest = max((len(b) for b in by_bytes), default=0)
    out = vmap.teacher_to_student.clone()
    for v, b in enumerate(t_bytes):
        if out[v] >= 0 or not b:
            continue
        for n in range(min(len(b), longest), 0, -1):
            hit = by_bytes.get(b[:n])
            if hit is not None:
                out[v] = hit
                break
    return out
