"""Token ids in the fewest whole bits: ``b = ceil(log2 V)`` bits per id, little-endian, packed back to back
into bytes (18 bits -- 2.25 bytes -- for the Qwen vocabulary of 151,936 ids, which does not fit 16 bits;
16 for SmolLM's 49,152). Written with plain tensor ops: four non-overlapping ``scatter_add`` s pack, a
gather of a few bytes per id unpacks; no extra dependency.
"""

from __future__ import annotations

import torch
from torch import Tensor


def bits_for(vocab_size: int) -> int:
    """Bits needed for ids ``0 .. vocab_size - 1`` (at least 1)."""
    return max(1, (int(vocab_size) - 1).bit_length())


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` ids of ``bits`` bits take."""
    return -(-count * bits // 8)


def _span(bits: int) -> int:
    """Bytes one id can touch: its bits start anywhere within a byte."""
    return -(-(bits + 7) // 8)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """``values`` (any int tensor, each in ``[0, 2**bits)``) → ``[packed_size(n, bits)]`` uint8."""
    if not 1 <= bits <= 56:
        raise ValueError(f"bits must be in [1, 56], got {bits}")
    flat = values.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"ids must lie in [0, 2**{bits}) to be packed in {bits} bits")
    start = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device) * bits
    byte, shift = start // 8, start % 8
    shifted = flat << shift
    out = torch.zeros(packed_size(flat.numel(), bits) + _span(bits), dtype=torch.int64, device=flat.device)
    for j in range(_span(bits)):  # the bits of different ids never overlap: adding is or-ing
        out.scatter_add_(0, byte + j, (shifted >> (8 * j)) & 0xFF)
    return out[: packed_size(flat.numel(), bits)].to(torch.uint8)


def unpack_bits(data: Tensor, bits: int, count: int) -> Tensor:
    """The first ``count`` ids of ``bits`` bits from packed bytes ``data`` → ``[count]`` int64."""
    if data.numel() < packed_size(count, bits):
        raise ValueError(f"{data.numel()} bytes cannot hold {count} ids of {bits} bits")
    padded = torch.cat([data.reshape(-1).to(torch.int64), data.new_zeros(_span(bits), dtype=torch.int64)])
    start = torch.arange(count, dtype=torch.int64, device=data.device) * bits
    byte, shift = start // 8, start % 8
    word = torch.zeros(count, dtype=torch.int64, device=data.device)
    for j in range(_span(bits)):
        word |= padded[byte + j] << (8 * j)
    return (word >> shift) & ((1 << bits) - 1)
