"""How many rows (tokens) each chunk of the fused loss takes: ``distillation.loss.chunk_size: auto``.

A chunk holds its student and teacher logits, ``rows × (Vs + Vt)`` floats; the naive path holds ``N ×
(Vs + Vt)`` several times over. Liger-Kernel sizes the chunks of its fused linear cross-entropy so that a
chunk's logits are about as large as the hidden-state input (``chunk = next_power_of_2(N / ceil(V / H))``,
Hsu et al., 2024); :func:`auto_chunk_size` applies the same rule to both sides together,
``rows · (Vs + Vt) ≈ N · (Hs + Ht)``, so the loss's workspace stays a fixed small fraction of the naive
path's -- ``(Hs + Ht) / (Vs + Vt)`` of its logits, under 1 % for LLM heads -- at any number of tokens.

Two bounds: at least :data:`MIN_CHUNK_ROWS` rows, because each chunk re-reads the whole output head(s) in
its matmuls and few-row matmuls waste most of the machine; at most ``N`` (one chunk).
"""

from __future__ import annotations

MIN_CHUNK_ROWS = 128
"""Fewest rows per automatic chunk. Measured on the 2-core CPU of BENCHMARKS.md, ``[M, 1024] @ [1024,
151936]`` (the real teacher's head) runs at 27 / 47 / 61 / 98 / 143 / 169 GFLOP/s for M = 16 / 32 / 64 / 128
/ 256 / 1024: below 128 rows the teacher-head matmul alone would make the fused loss slower than the naive
one. At N = 2,048 tokens this bound is what sets the chunk (the Liger size is 16-33 rows there)."""


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


def auto_chunk_size(
    n_tokens: int, student_vocab: int, teacher_vocab: int, student_hidden: int, teacher_hidden: int
) -> int:
    """Rows per chunk for ``n_tokens`` positions (see the module docstring).

    ``teacher_vocab`` / ``teacher_hidden`` are 0 when no teacher logits are computed (a stored sparse
    teacher, cross-entropy alone)."""
    n_tokens = max(1, n_tokens)
    growth = -(-(student_vocab + teacher_vocab) // max(1, student_hidden + teacher_hidden))
    liger = _next_power_of_two(-(-n_tokens // max(1, growth)))
    return min(n_tokens, max(MIN_CHUNK_ROWS, liger))


def resolve_chunk_size(
    chunk_size: int | str, n_tokens: int, vocab: tuple[int, int], hidden: tuple[int, int]
) -> int:
    """``chunk_size`` itself when it is a number, else :func:`auto_chunk_size` for ``n_tokens`` positions
    and the ``(student, teacher)`` vocabulary and hidden sizes."""
    if chunk_size == "auto":
        return auto_chunk_size(n_tokens, vocab[0], vocab[1], hidden[0], hidden[1])
    return int(chunk_size)


def check_chunk_size(chunk_size: int | str) -> None:
    """Raise ``ValueError`` unless ``chunk_size`` is ``"auto"`` or an integer >= 1."""
    if chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto' or an integer >= 1, got {chunk_size!r}")
