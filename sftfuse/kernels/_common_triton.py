"""Triton helpers shared by the elementwise kernels (RMSNorm, gated MLP)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def cast_rne(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 `x` cast to `dtype`, rounding to nearest even. The interpreter's fp32 -> bf16 cast truncates; with
    EMULATE (set under the interpreter) a bf16 target is rounded in the integer bits first, so the cast is exact."""
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
