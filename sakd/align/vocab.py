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
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from sakd.align.token_bytes import SPECIAL_ROLES, TokenTable, token_bytes, token_table
from sakd.losses.vocab_map import check_vocab_map

__all__ = ["VocabMap", "build_vocab_map", "load_or_build_vocab_map", "token_bytes"]

_FORMAT_VERSION = "1"


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


def _build(student: TokenTable, teacher: TokenTable) -> VocabMap:
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
    for role in SPECIAL_ROLES:
        if role in student.role_ids and role in teacher.role_ids:
            pair(student.role_ids[role], teacher.role_ids[role])
    teacher_special = {teacher.tokens[t]: t for t in sorted(teacher.special_ids, reverse=True)}
    for s in sorted(student.special_ids):
        t = teacher_special.get(student.tokens[s])
        if t is not None:
            pair(s, t)

    # Ordinary tokens: group ids by bytes on both sides, then pair each group in preference order
    # (real pieces before '<0xNN>' byte-fallback pieces, then by id).
    def groups(table: TokenTable) -> tuple[dict[bytes, int], dict[bytes, list[int]]]:
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
    return _build(token_table(student_tok), token_table(teacher_tok))


def _cache_key(student: TokenTable, teacher: TokenTable) -> str:
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
    student, teacher = token_table(student_tok), token_table(teacher_tok)
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
