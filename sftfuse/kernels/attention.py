"""CPU attention with the scores materialised: batched GEMMs instead of torch's flash kernel.

For q (B, Hq, T, D), k and v (B, Hk, S, D), G = Hq / Hk query heads per key/value head, scale c:
    forward:   S = c q k^T + bias (fp32),  P = softmax(S) (stored 16-bit),  O = P v
    backward:  dP = dO v^T,  dS = P * (dP - rowsum(dP * P)),  dq = c dS k,  dk = c dS^T q,  dv = P^T dO
The G query heads that share a key/value head are folded into the rows of one GEMM ((B Hk, G T, D) against
(B Hk, S, D)), so grouped-query attention needs no repeated copy of k and v, and dk and dv come out summed over
the group. The bias (the causal triangle or the caller's additive mask) is added inside the first GEMM
(`baddbmm`). S is computed in fp32, the one GEMM that runs at the fp32 rate: rounded to 16 bits before the
softmax (as Hugging Face's eager attention rounds it), sharp attention (logits spread over 4-10) came out 5-10x
further from fp64 than torch's own bf16 attention, whose flash kernel keeps its scores in fp32. The other five
GEMMs take 16-bit operands. The forward keeps P for the backward: 2 B Hq T S bytes, 4.7 MB per layer at
SmolLM2's 4 x 256 tokens (9 query heads), against the 2.4 MB fp32 output the flash path keeps.

Why: torch's CPU flash-attention kernel runs its small per-block GEMMs at about the fp32 rate in either dtype, so
on a host whose bf16 GEMMs are fast (AMX: 1.6-2.3 TFLOP/s against fp32's 0.3) it leaves most of the host idle.
Measured on this project's AMX Xeon (2 cores; SmolLM2's shape, causal, 3 key/value heads, forward and backward):
flash in fp32 13.3-14.7 ms a layer, this 9.5 ms (6.2-7.5 ms with S in bf16). Where 16-bit GEMMs are not fast its
passes over the scores cost more than its GEMMs save (a 2-core Zen 5: 18 against flash's 15 ms), so
`sftfuse.kernels._cpu` times it against flash on each host and picks (`attention_mode`).

Limits: used only where the scores fit `SCORES_MAX_BYTES` (the memory P takes per call); a row whose keys are
all masked gives a zero output and zero gradients, as torch's flash kernel does.
"""

from __future__ import annotations

from functools import lru_cache

import torch

SCORES_MAX_BYTES = 8 << 20  # P kept per call: SmolLM2 at 4 x 256 tokens needs 4.7 MB; longer rows take flash


def attention_ref(q, k, v, *, attn_mask=None, is_causal=False, scale=None, upcast=True):
    """softmax(c q k^T + bias) v for q (B, Hq, T, D), k, v (B, Hk, S, D), in fp64 when upcast; rows with every key
    masked give zeros (torch's flash kernel's convention)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
        attn_mask = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = p @ v
    return out if upcast else out.to(dtype)


def scores_fit(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether P for q (B, Hq, T, D) against k (B, Hk, S, D) fits SCORES_MAX_BYTES."""
    b, hq, t, _ = q.shape
    return b * hq * t * k.shape[-2] * q.element_size() <= SCORES_MAX_BYTES


@lru_cache(maxsize=16)
def _causal_bias(t: int, s: int, g: int) -> torch.Tensor:
    """(G T, S) fp32: 0 where key s <= query t (torch's top-left causal alignment), -inf above, per folded head."""
    bias = torch.zeros(t, s).masked_fill_(torch.ones(t, s, dtype=torch.bool).triu_(1), float("-inf"))
    return bias.repeat(g, 1)


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool (True keeps) or float attention mask as the additive fp32 bias torch's function makes of it."""
    if mask.is_floating_point():
        return mask.detach().float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


def _fold_mask(mask: torch.Tensor, b: int, hk: int, g: int):
    """A mask broadcastable to (B, Hq, T, S) (bool: True keeps; float: added) as an additive (B Hk | 1, G T, S)
    fp32 bias, and the rows whose keys are all masked ((B Hk | 1, G T, 1) bool) or None. The last mask
    folded is kept with its result: a model hands every layer the same mask, and folding a (B, 1, T, S) one is a
    copy of B Hq T S values (3.5 ms a layer at SmolLM2's 4 x 256 tokens on an AMX Xeon, a third of the layer's
    attention). The entry holds the mask itself, so it cannot be freed and another take its place; a mask changed
    in place since (its version) is folded again."""
    key = (mask._version, tuple(mask.shape), b, hk, g)
    if _LAST_FOLD and _LAST_FOLD[0] is mask and _LAST_FOLD[1] == key:
        return _LAST_FOLD[2]
    *lead, t, s = mask.shape
    bias = additive_mask(mask.reshape(*([1] * (2 - len(lead))), *lead, t, s))  # (Bm, Hm, T, S)
    dead = (bias == float("-inf")).all(-1, keepdim=True)
    dead = dead if bool(dead.any()) else None
    if bias.shape[0] == 1 and bias.shape[1] == 1:  # one mask for every row: broadcast over B Hk
        out = bias[0, 0].repeat(g, 1), None if dead is None else dead[0, 0].repeat(g, 1)
    else:
        def fold(m):
            return m.expand(b, hk * g, *m.shape[2:]).reshape(b * hk, g * t, m.shape[-1])

        out = fold(bias), None if dead is None else fold(dead)
    _LAST_FOLD[:] = [mask, key, out]
    return out


_LAST_FOLD: list = []  # [mask, its key, (bias, dead)]: `_fold_mask`'s one-entry cache


def _fold(q, k, v, scale):
    """The sizes (B, Hk, G, T, S, D), the scale c, and q, k, v as (B Hk, G T, D), (B Hk, S, D), (B Hk, S, D)."""
    b, hq, t, d = q.shape
    hk, s = k.shape[1], k.shape[2]
    g = hq // hk
    views = q.reshape(b * hk, g * t, d), k.reshape(b * hk, s, d), v.reshape(b * hk, s, d)
    return (b, hk, g, t, s, d), d**-0.5 if scale is None else scale, views


def scores_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask=None,
                         is_causal: bool = False, scale: float | None = None):
    """(out (B, Hq, T, D), P (B Hk, G T, S)) in q's dtype, for q (B, Hq, T, D), k and v (B, Hk, S, D) of one
    dtype, Hq a multiple of Hk; attn_mask None, or a bool (True keeps) or additive float mask broadcastable to
    (B, Hq, T, S) (not with is_causal)."""
    (b, hk, g, t, s, d), c, (qf, kf, vf) = _fold(q, k, v, scale)
    dead = None
    if is_causal:
        bias = _causal_bias(t, s, g)
    elif attn_mask is not None:
        bias, dead = _fold_mask(attn_mask, b, hk, g)
    q32, k32 = qf.float(), kf.float().transpose(1, 2)
    if is_causal or attn_mask is not None:
        scores = torch.baddbmm(bias, q32, k32, alpha=c)  # (B Hk, G T, S) fp32
    else:
        scores = torch.bmm(q32, k32).mul_(c)
    del q32, k32
    p = torch.softmax(scores, -1)
    del scores
    if dead is not None:  # softmax over all -inf is NaN: those rows attend to nothing
        p.masked_fill_(dead, 0.0)
    p = p.to(q.dtype)
    return torch.bmm(p, vf).view(b, hk * g, t, d), p


def scores_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, *,
                         scale: float | None = None, need=(True, True, True)):
    """(dq, dk, dv) in q's dtype (None where `need` says so) from the forward's P; dk and dv summed over each
    key/value head's group."""
    (b, hk, g, t, s, d), c, (qf, kf, vf) = _fold(q, k, v, scale)
    dof = dout.reshape(b * hk, g * t, d)
    dv = torch.bmm(p.transpose(1, 2), dof).view(b, hk, s, d) if need[2] else None
    dp = torch.bmm(dof, vf.transpose(1, 2))  # (B Hk, G T, S)
    ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
    del dp
    dq = torch.bmm(ds, kf).mul_(c).view(b, hk * g, t, d) if need[0] else None
    dk = torch.bmm(ds.transpose(1, 2), qf).mul_(c).view(b, hk, s, d) if need[1] else None
    return dq, dk, dv
