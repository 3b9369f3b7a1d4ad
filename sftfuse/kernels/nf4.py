"""NF4 4-bit weights in bitsandbytes' byte format, and a matmul that dequantizes them on the fly.

Format (QLoRA, Dettmers et al. 2023, arXiv:2305.14314; bitsandbytes `quantize_4bit`). W (N, K) is flattened
row-major and cut into blocks of `blocksize` (64) values. Block b keeps absmax_b = max|w| and each value the index
q of the nearest of 16 NormalFloat codes c (normal quantiles on [-1, 1]) to w / absmax_b, so
W_hat[i] = c[q_i] * absmax[i // blocksize]. Two indices share a byte, element 2i in the high nibble. With double
quantization absmax_b - mean(absmax) is stored as uint8 indices into bitsandbytes' 256-entry signed dynamic map,
with one fp32 scale per 256 blocks: absmax_b = dyn[qa_b] * absmax2[b // 256] + offset.

Bytes: 4 + 8/64 + 32/16384 = 4.127 bits per weight, 0.258x of bf16 (0.266x with fp32 absmax). Llama-2-7B's
6.5 G linear weights: 13 GB in bf16, 3.4 GB in NF4.

Matmul: y = x @ W_hat^T + b (forward), dx = dy @ W_hat (backward; the base is frozen, no dW).
- Triton (sftfuse/kernels/nf4_triton.py, launched from sftfuse/kernels/nf4_launch.py): either a GEMM whose K
  loop (N loop for the backward layout) loads packed bytes and uint8 scales and decodes them in registers, no
  dequantized weight in global memory, or one dequantize pass into a reused 16-bit buffer and the library GEMM.
  `plan` (nf4_launch's bytes/FLOPs model) picks per call: fused while the GEMM is bound by weight bytes (few
  tokens), dequantize + cuBLAS once it is compute-bound and decoding per M tile costs more than decoding once.
- PyTorch (CPU): rows of W are decoded a tile at a time (<= TILE_ELEMS values) through a 256-entry
  byte -> (code[hi], code[lo]) table, one gather per two values, scaled in fp32 (bitsandbytes' rounding) and
  cast once to the GEMM dtype, then multiplied by the library GEMM. The GEMM dtype is the CPU plan's
  (`sftfuse.kernels._cpu`): bf16 tiles where the host multiplies bf16 fast (AMX: ~8x fp32's rate), fp32 where an
  fp32 GEMM is faster (AVX512-BF16 without AMX: ~1.8x); the fp32 tile is then the decode's own output, with no
  cast. Only one tile of decoded weight exists at a time; the tile sizes come from the L2 size (`nf4_tiles`).
  Where this machine's C compiler could build it, the decode itself runs as native code of the same arithmetic
  (sftfuse/kernels/nf4_decode.c, `sftfuse.kernels._native`: one pass, AVX-512, torch's OpenMP threads, the double
  quantization decoded on the way), bit-equal to the torch ops: 5x faster, which brought the matmul from 1.1-1.3x
  bitsandbytes' time to 0.97-1.02x (run to run) on a 2-core AMD EPYC.

Rounding matches bitsandbytes 0.50 on CPU, checked in tests/kernels/test_nf4.py: NF4 indices are the nearest code, ties
to the lower one; the nested 8-bit indices follow bitsandbytes' native CPU quantizer, which snaps the normalized
value to a 2^16-point grid on [-1, 1] before taking the nearest code (its pure-PyTorch fallback and CUDA kernel
round differently on ~0.1% of scales, by one code step; every variant dequantizes identically).
Limits: 2-D weights with fewer than 2^31 values; blocksize a power of two in 32..4096.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import torch
import torch.nn.functional as F

from sftfuse.kernels._cpu import nf4_tiles
from sftfuse.kernels._native import nf4_decode_native
from sftfuse.kernels._registry import (
    CheckContext,
    CheckResult,
    max_error,
    register_check,
    tolerance,
    use_triton,
)
from sftfuse.kernels.nf4_launch import dequantize_triton, matmul_triton, plan  # noqa: F401 (plan: the cost model's)

NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# CPU path: at most TILE_ELEMS decoded weight values exist at once (2^20 with a 2 MiB L2: 2 MiB in bf16), decoded
# _SUB at a time; both from this CPU's L2 size (`sftfuse.kernels._cpu.nf4_tiles`)
TILE_ELEMS, _SUB = nf4_tiles()
_CHUNK = 1 << 20  # quantizer: values per pass, so temporaries stay a few MiB however large the weight


@dataclass
class NF4Weight:
    """A 4-bit NF4 weight in bitsandbytes' layout.

    packed: uint8 (ceil(numel/2),); absmax: uint8 (n_blocks,) with double quant, else fp32; nested_absmax: fp32
    (ceil(n_blocks/256),) or None; nested_code: fp32 (256,) or None; offset: float (0.0 without double quant);
    code: fp32 (16,); shape: (out, in); dtype: the original weight's dtype (dequantize's default output).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: float
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        ts = (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.code)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device) -> NF4Weight:
        mv = (lambda t: None if t is None else t.to(device))
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax), nested_absmax=mv(self.nested_absmax),
                       nested_code=mv(self.nested_code), code=mv(self.code))

    def scales(self) -> torch.Tensor:
        """Per-block absmax in fp32, (n_blocks,), decoding the double quantization as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax.float()
        nb = self.absmax.numel()
        groups = self.nested_absmax.numel()
        # broadcasting over (groups, 256), not repeat_interleave: that one opens a thread team (slow when busy)
        dq = torch.zeros(groups * NESTED_BLOCKSIZE, dtype=torch.float32, device=self.absmax.device)
        dq[:nb] = self.nested_code.index_select(0, self.absmax.int())  # a[idx] opens a thread team too
        dq = dq.view(groups, NESTED_BLOCKSIZE).mul_(self.nested_absmax[:, None]).view(-1)[:nb]
        return dq.add_(self.offset)


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)): 256 sorted fp32 values.

    For exponent e = 0..6 it holds +-10^(e-6) times the midpoints of 2^e + 1 points evenly spaced on [0.1, 1],
    then 0 and 1: 2 * 127 + 2 = 256 values.
    """
    vals = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        vals += ((10 ** (e - 6)) * mids).tolist() + ((-(10 ** (e - 6))) * mids).tolist()
    return torch.tensor(sorted(vals), dtype=torch.float32)


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _nearest(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of sorted `code`, ties to the lower index (bucketize on midpoints)."""
    return torch.bucketize(x, (code[:-1] + code[1:]) / 2, out_int32=True)


def _blockwise_absmax(v: torch.Tensor, blocksize: int) -> torch.Tensor:
    full = v.numel() // blocksize * blocksize
    am = v[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < v.numel():
        am = torch.cat([am, v[full:].abs().amax().reshape(1)])
    return am


def _quantize_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(uint8 indices, fp32 scales per 256 blocks, offset) for per-block absmax, as bitsandbytes' CPU library."""
    offset = absmax.mean()
    x = absmax - offset
    scale2 = _blockwise_absmax(x, NESTED_BLOCKSIZE)
    normed = x / scale2.repeat_interleave(NESTED_BLOCKSIZE)[: x.numel()]
    half = 32767.5  # the 2^16-point grid on [-1, 1] that bitsandbytes' CPU quantizer snaps to first
    snapped = torch.floor((normed + 1) * half + 0.5) / half - 1
    idx = _nearest(snapped, dynamic_map().to(x.device))
    idx = torch.where(torch.isnan(normed), 0, idx)  # a group of equal absmax: 0/0, dequantizes to the offset
    return idx.to(torch.uint8), scale2, float(offset)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize `weight` (out, in) to NF4, byte-identical to bitsandbytes `quantize_4bit(quant_type="nf4")`.

    Works in chunks of 2^20 values, so temporaries stay small whatever the weight's size.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight: expected a 2-D floating tensor, got {getattr(weight, 'shape', type(weight))}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize}: expected one of {BLOCKSIZES}")
    n = weight.numel()
    if n >= 2**31:
        raise ValueError(f"weight: {n} values, the kernels index with int32 (limit 2^31)")
    flat = weight.detach().reshape(-1)
    code = nf4_code(weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    chunk = _CHUNK // blocksize * blocksize
    for s in range(0, n, chunk):
        v = flat[s:s + chunk].float()
        am = _blockwise_absmax(v, blocksize)
        absmax[s // blocksize:s // blocksize + am.numel()] = am
        full = v.numel() // blocksize * blocksize
        # bitsandbytes multiplies full blocks by a reciprocal but divides the last partial block: keep both
        scaled = (v[:full].view(-1, blocksize) * (1.0 / am[: full // blocksize].clamp(min=1e-38))[:, None]).view(-1)
        if full < v.numel():
            scaled = torch.cat([scaled, v[full:] / am[-1].clamp(min=1e-38)])
        idx = _nearest(scaled.clamp_(-1, 1), code)
        if idx.numel() % 2:
            idx = torch.cat([idx, _nearest(torch.zeros(1, device=idx.device), code)])  # pad value 0.0
        idx = idx.to(torch.uint8)
        packed[s // 2:s // 2 + idx.numel() // 2] = (idx[0::2] << 4) | idx[1::2]
    nested_absmax = nested_code = None
    offset = 0.0
    if double_quant:
        absmax, nested_absmax, offset = _quantize_nested(absmax)
        nested_code = dynamic_map().to(weight.device, copy=True)  # per weight: safetensors rejects shared storage
    return NF4Weight(packed, absmax, nested_absmax, nested_code, offset, code, blocksize,
                     (int(weight.shape[0]), int(weight.shape[1])), weight.dtype)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch path: row tiles decoded through a byte -> (hi, lo) table


@lru_cache(maxsize=16)
def _pair_table(device: torch.device, code: tuple[float, ...]) -> torch.Tensor:
    """(256,) int64 whose bytes are the fp32 pair (code[b >> 4], code[b & 15]): one 8-byte gather per byte."""
    c = torch.tensor(code, dtype=torch.float32, device=device)
    b = torch.arange(256, device=device)
    return torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous().view(torch.int64).view(256)


# _SUB, values decoded per step: large enough that each op's thread team pays for its start (1 << 15 cost 1.6x the
# decode time of 1 << 18 on 2 quiet cores), small enough that a bf16 output's fp32 temporary stays in L2.
# An fp32 output (GEMMs in fp32, `sftfuse.kernels._cpu`) is gathered straight into place, with no temporary.


def _native_for(q: NF4Weight, dtype: torch.dtype):
    """The native decode for q into `dtype` (`sftfuse.kernels._native`), or None: torch ops decode it."""
    return nf4_decode_native() if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) else None


def _tile_scales(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor | None:
    """The per-block scales that `_decode_flat` needs for q's tiles: None where the native decode reads them."""
    return None if _native_for(q, dtype) is not None else q.scales()


def _decode_flat(q: NF4Weight, start: int, end: int, scales: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Write dequantized values [start, end) of the flat weight into `out` (end - start,); `start` on a block.
    The native decode where it is built, else torch ops: the same values. scales: `q.scales()`, or None to let
    the native decode read the double quantization itself (computed here if torch ops run)."""
    bs = q.blocksize
    native = _native_for(q, out.dtype)
    if native is not None and out.is_contiguous():
        return _decode_native(native, q, start, end, scales, out)
    scales = q.scales() if scales is None else scales
    table = _pair_table(q.device, tuple(q.code.tolist()))
    packed = q.packed
    for s in range(0, end - start, _SUB):
        e = min(end - start, s + _SUB)
        idx = packed[(start + s) // 2:(start + e + 1) // 2].int()  # int32 indices: index_select skips an int64 copy
        direct = out.dtype == torch.float32 and (e - s) % 2 == 0  # gather straight into an fp32 output
        if direct:
            vals = torch.index_select(table, 0, idx, out=out[s:e].view(torch.int64)).view(torch.float32)
        else:
            vals = table.index_select(0, idx).view(torch.float32)  # (2 * bytes,) fp32
        full = (e - s) // bs * bs
        b0 = (start + s) // bs
        vals[:full].view(-1, bs).mul_(scales[b0:b0 + full // bs, None])
        if full < e - s:  # the weight's last, partial block
            vals[full:e - s].mul_(scales[b0 + full // bs])
        if not direct:
            out[s:e].copy_(vals[:e - s])  # one rounding to the compute dtype, as bitsandbytes
    return out


def _decode_native(native, q: NF4Weight, start: int, end: int, scales: torch.Tensor | None, out: torch.Tensor):
    """`_decode_flat` by the C decode; with double quantization and no `scales` given, it decodes the scales too."""
    dq = scales is None and q.double_quant
    ts = (q.packed, q.code, *((q.absmax, q.nested_code, q.nested_absmax) if dq else
                              (q.scales() if scales is None else scales,)))
    for t, want in zip(ts, _NATIVE_DTYPES[dq]):
        if t.dtype != want or not t.is_contiguous():
            raise TypeError(f"NF4Weight: the native decode takes contiguous {_NATIVE_DTYPES[dq]}, got {t.dtype}")
    ptr = [t.data_ptr() for t in ts]
    bf16 = out.dtype == torch.bfloat16
    native(ptr[0], None if dq else ptr[2], ptr[2] if dq else None, ptr[3] if dq else None, ptr[4] if dq else None,
           q.offset, ptr[1], start, end - start, q.blocksize, out.data_ptr() if bf16 else None,
           None if bf16 else out.data_ptr(), torch.get_num_threads())
    return out


# (packed, code, scales) and, with double quantization decoded natively, (packed, code, absmax, nested code, scales)
_NATIVE_DTYPES = {False: (torch.uint8, torch.float32, torch.float32),
                  True: (torch.uint8, torch.float32, torch.uint8, torch.float32, torch.float32)}


@lru_cache(maxsize=8)
def _scratch(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The one 16-bit tile buffer of the CPU matmul, reused across calls (TILE_ELEMS values)."""
    return torch.empty(TILE_ELEMS, dtype=dtype, device=device)


def _row_tiles(q: NF4Weight):
    """(r0, r1) row ranges of <= TILE_ELEMS values, each starting on a block boundary."""
    rows, cols = q.shape
    step = q.blocksize // math.gcd(cols, q.blocksize)  # rows per block-aligned step
    per = max(step, TILE_ELEMS // cols // step * step)
    return [(r0, min(rows, r0 + per)) for r0 in range(0, rows, per)]


def _decode_rows(q: NF4Weight, r0: int, r1: int, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Rows [r0, r1) of the dequantized weight, (r1 - r0, in), in the shared scratch tile when it fits."""
    cols = q.shape[1]
    n = (r1 - r0) * cols
    buf = _scratch(q.device, dtype)
    out = buf[:n] if n <= buf.numel() else torch.empty(n, dtype=dtype, device=q.device)
    return _decode_flat(q, r0 * cols, r1 * cols, scales, out).view(r1 - r0, cols)


def _dequantize_torch(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(q.numel, dtype=dtype, device=q.device)
    return _decode_flat(q, 0, q.numel, None, out).view(q.shape)


def _fwd_torch(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    from sftfuse.kernels._cpu import gemm_dtype

    cd = gemm_dtype(x.dtype, x.device)  # x's dtype, or fp32 where that GEMM is faster on this CPU
    tiles, scales = _row_tiles(q), _tile_scales(q, cd)
    xc, bc = x.to(cd), None if bias is None else bias.to(cd)
    if len(tiles) == 1:
        return F.linear(xc, _decode_rows(q, 0, q.shape[0], scales, cd), bc).to(x.dtype)
    y = torch.empty(x.shape[0], q.shape[0], dtype=x.dtype, device=x.device)  # (M, N)
    for r0, r1 in tiles:
        y[:, r0:r1] = F.linear(xc, _decode_rows(q, r0, r1, scales, cd), None if bc is None else bc[r0:r1])
    return y


def _bwd_torch(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    from sftfuse.kernels._cpu import gemm_dtype

    cd = gemm_dtype(dy.dtype, dy.device)
    tiles, scales = _row_tiles(q), _tile_scales(q, cd)
    dyc = dy.to(cd)
    if len(tiles) == 1:
        return (dyc @ _decode_rows(q, 0, q.shape[0], scales, cd)).to(dy.dtype)
    dx = torch.zeros(dy.shape[0], q.shape[1], dtype=torch.float32, device=dy.device)  # (M, K), fp32 sum of tiles
    for r0, r1 in tiles:
        if cd == torch.float32:
            dx.addmm_(dyc[:, r0:r1], _decode_rows(q, r0, r1, scales, cd))
        else:
            dx += (dyc[:, r0:r1] @ _decode_rows(q, r0, r1, scales, cd)).float()
    return dx.to(dy.dtype)


def nf4_matmul_ref(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None, *, upcast: bool = True):
    """y = x @ dequant(q)^T + b on the fully dequantized weight; fp64 with `upcast`. x (M, K) -> (M, N)."""
    dt = torch.float64 if upcast else x.dtype
    w = _dequantize_torch(q, torch.float32).to(dt)
    return F.linear(x.to(dt), w, None if bias is None else bias.to(dt))


# ---------------------------------------------------------------------------------------------------------------
# Launchers: check the inputs and take the Triton or the PyTorch path


def _use_triton(*tensors: torch.Tensor) -> bool:
    """The op's one Triton-or-PyTorch decision (`sftfuse.kernels._registry.use_triton`: CUDA tensors, or the
    SFTFUSE_BACKEND override); every launcher below asks it."""
    return use_triton(*tensors)


def _check(x: torch.Tensor, q: NF4Weight, dim: int, name: str) -> None:
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    if x.dim() != 2 or x.shape[1] != q.shape[dim] or not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating (M, {q.shape[dim]}) tensor, got {x.dtype} {tuple(x.shape)}")


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """The dequantized weight (out, in) in `dtype` (None: q.dtype), equal to bitsandbytes' `dequantize_4bit`."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    dtype = dtype or q.dtype
    if _use_triton(q.packed):
        return dequantize_triton(q, dtype)
    return _dequantize_torch(q, dtype)


def nf4_matmul_fwd(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(q)^T + bias, in x's dtype. x: (M, in) -> y: (M, out). No autograd."""
    _check(x, q, 1, "x")
    if bias is not None:
        if bias.shape != (q.shape[0],):
            raise ValueError(f"bias: expected shape ({q.shape[0]},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    if _use_triton(x, q.packed):
        return matmul_triton(x, q, bias, transposed=False)
    with torch.no_grad():  # the weight tile is a reused scratch buffer: never let autograd save it
        return _fwd_torch(x, q, bias)


def nf4_matmul_bwd(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """dx = dy @ dequant(q), in dy's dtype. dy: (M, out) -> dx: (M, in). No autograd."""
    _check(dy, q, 0, "dy")
    if _use_triton(dy, q.packed):
        return matmul_triton(dy, q, None, transposed=True)
    with torch.no_grad():
        return _bwd_torch(dy, q)


# ---------------------------------------------------------------------------------------------------------------
# `sftfuse verify`: the Triton path against the fp64 reference, in PyTorch's own error where it is 16-bit


def _verify(ctx: CheckContext) -> None:
    shapes = [(4096, 4096, 4096), (512, 1536, 576)] if ctx.large else [(37, 129, 99), (3, 576, 64)]
    for m, k, n in shapes:
        q = quantize_nf4(torch.randn(n, k, device=ctx.device), double_quant=k % 2 == 0)
        for dtype in ctx.dtypes:
            x = torch.randn(m, k, device=ctx.device, dtype=dtype)
            dy = torch.randn(m, n, device=ctx.device, dtype=dtype)
            ref = nf4_matmul_ref(x, q)
            w64 = nf4_matmul_ref(torch.eye(k, device=ctx.device, dtype=torch.float64), q).t()  # (N, K)
            dref = dy.double() @ w64
            for path, out, r in (("fwd", matmul_triton(x, q, None, transposed=False), ref),
                                 ("bwd", matmul_triton(dy, q, None, transposed=True), dref)):
                base = None if dtype == torch.float32 else max_error(
                    (x @ w64.t().to(dtype) if path == "fwd" else dy @ w64.to(dtype)), r)
                ctx.results.append(CheckResult("nf4_matmul", path, str(dtype).removeprefix("torch."),
                                               f"{m}x{k}x{n}", max_error(out, r), tolerance(r, dtype, base)))


register_check("nf4_matmul", _verify)
