"""The LoRA dropout mask of the PyTorch (CPU) path: drawn once per adapter per step, kept as bits for the backward.

Drop element i of x (M, K) iff its 16-bit draw v_i (signed) < round(p * 2^16) - 2^15: probability
round(p * 2^16) / 2^16, within 2^-17 of p. The draws are the bytes of int64 words from torch's own CPU generator
(mt19937), seeded by the adapter's seed, four draws per word: `Tensor.random_` over the full 64-bit range (its
default range leaves the top bit 0, which would never drop a quarter of the elements). So a mask is a pure function
of (seed, numel, p): a fixed seed reproduces it, and mt19937 runs on one thread whatever torch's thread count.

Cost on this project's 2-core AMX Xeon (1024 x 576, one thread): the draw 0.40 ms, the compare 0.25 ms, packing
0.07 ms and unpacking 0.04 ms; `F.dropout` on the same x 3.0 ms, and the hash-table gather this replaced 0.9 ms per
call, made twice per adapter (forward and backward). Kept for the backward as bits, 1/16 of a bf16 x (M K / 8
bytes; SmolLM2 at 1024 tokens, 7 adapters x 30 layers: 19 MB), instead of an fp32 dropped-out copy of x (PEFT).

Packing: the bool mask (0/1 bytes) is read as int64 words of 8 bytes b_0..b_7 (little-endian); the product with
0x0102040810204080 holds sum_i b_i 2^i in its top byte (no carries: each b_i is 0 or 1). Unpacking gathers each
byte's 8 bool bytes from a 256-entry int64 table. Both are one pass over M K / 8 words.

The Triton path keeps its own counter-based hash (`sftfuse.kernels.lora.dropout_mask`), computed in registers.
"""

from __future__ import annotations

import sys
from functools import lru_cache

import torch

_PACK = 0x0102040810204080  # top byte of (bytes b_0..b_7) * _PACK is sum_i b_i 2^i
if sys.byteorder != "little":  # the packing reads a bool tensor's bytes as int64 words, low byte first
    raise ImportError("sftfuse.kernels.dropout: the bit packing assumes a little-endian CPU")


def drop_threshold16(p: float) -> int:
    """Drop a signed 16-bit draw iff it is < this: probability round(p * 2^16) / 2^16."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p: expected 0 <= p < 1, got {p}")
    return round(p * 65536) - 32768


def drop_mask(seed: int, numel: int, p: float, *, device=None) -> torch.Tensor:
    """Drop mask (True = dropped), bool (numel rounded up to 8,): a pure function of (seed, numel, p).

    View `[:numel]` as (M, K) for a mask of x (M, K). The draws come from a CPU generator (moved to `device` after).
    """
    words = -(-numel // 8) * 2  # 4 draws per int64 word: numel rounded up to a multiple of 8 draws
    gen = torch.Generator().manual_seed(int(seed))
    draws = torch.empty(words, dtype=torch.int64).random_(-(2**63), None, generator=gen)
    mask = draws.view(torch.int16).lt(drop_threshold16(p))
    return mask if device is None or torch.device(device).type == "cpu" else mask.to(device)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor of a multiple of 8 elements as uint8 bits (numel / 8,): element 8j + i is bit i of byte j."""
    flat = mask.reshape(-1)
    if flat.dtype != torch.bool or flat.numel() % 8:
        raise ValueError(f"mask: expected a bool tensor of a multiple of 8 elements, got {mask.dtype} {mask.numel()}")
    return flat.view(torch.uint8).view(torch.int64).mul(_PACK).bitwise_right_shift_(56).to(torch.uint8)


@lru_cache(maxsize=4)
def _unpack_table(device: torch.device) -> torch.Tensor:
    """(256,) int64 whose 8 bytes are byte value v's bits, bit i in byte i (0 or 1)."""
    v = torch.arange(256)
    return ((v[:, None] >> torch.arange(8)) & 1).to(torch.uint8).contiguous().view(torch.int64).view(256).to(device)


def unpack_bits(bits: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The bool (rows, cols) mask `pack_bits` packed (from a mask of at least rows * cols elements)."""
    if bits.dtype != torch.uint8 or bits.numel() * 8 < rows * cols:
        raise ValueError(f"bits: expected uint8 holding >= {rows * cols} bits, got {bits.dtype} {bits.numel()} bytes")
    flat = _unpack_table(bits.device).index_select(0, bits.reshape(-1).int()).view(torch.bool)
    return flat[: rows * cols].view(rows, cols)
