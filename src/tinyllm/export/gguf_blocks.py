"""Pure functions: tinyllm quantized records <-> GGUF block types (the llama.cpp ggml layouts).

Every legacy GGUF block covers 32 consecutive weights of one row:
  Q4_0  d:f16, qs:16 bytes            w = d * (q - 8)        q in [0, 15]
  Q4_1  d:f16, m:f16, qs:16 bytes     w = d * q + m          q in [0, 15]
  Q5_0  d:f16, qh:u32, qs:16 bytes    w = d * (q - 16)       q in [0, 31]
  Q5_1  d:f16, m:f16, qh:u32, qs:16   w = d * q + m          q in [0, 31]
  Q8_0  d:f16, qs:32 x int8           w = d * q              q in [-128, 127]
Low nibbles: byte j of qs holds weight j in its low 4 bits and weight j + 16 in its high 4 bits;
for 5-bit types bit j of qh is the fifth bit of weight j. A tinyllm grid w = s * (q - z) with
groups of 32 (or any multiple of 32: the scale is repeated) maps onto these exactly, so quantized
integers are carried, not re-derived.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from tinyllm.kernels.iq4grid import fit_iq4nl, fit_iq4xs, iq4xs_superblocks, is_iq4nl
from tinyllm.kernels.kgrid import derive, fit_kgrid, kspec, quantize_on
from tinyllm.kernels.qweight import QuantizedWeight

BLOCK = 32
# type -> (bits, needs a symmetric grid, has a min term m)
CARRIABLE: dict[T, tuple[int, bool, bool]] = {
    T.Q4_0: (4, True, False),
    T.Q4_1: (4, False, True),
    T.Q5_0: (5, True, False),
    T.Q5_1: (5, False, True),
    T.Q8_0: (8, True, False),
}


def why_not_carried(qw: QuantizedWeight, qtype: T) -> str | None:
    """None when qw's integers and scales fit qtype's blocks exactly, else the reason."""
    if qtype not in CARRIABLE:
        return f"{qtype.name} is not a block type tinyllm writes from integers"
    bits, needs_sym, _ = CARRIABLE[qtype]
    if qw.codebook is not None:
        return "codebook values (NF4, IQ4_NL) are not on an integer grid"
    if qw.kquant is not None:
        return (
            f"{qw.kquant} grids have float mins and super-block scales (export as GGUF {qw.kquant})"
        )
    if qw.bits != bits:
        return f"{qw.bits}-bit codes do not fit {qtype.name}'s {bits} bits"
    if needs_sym and not qw.sym:
        return f"{qtype.name} has no zero point; the grid is asymmetric"
    if qw.perm is not None:
        return "columns are permuted (act-order without static groups)"
    if qw.effective_group % BLOCK or qw.shape[1] % BLOCK:
        return f"group size {qw.group_size} is not a multiple of {BLOCK}"
    return None


def _block_params(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes [rows, nblocks, 32] and per-block scale and zero [rows, nblocks]."""
    rows, cols = qw.shape
    rep = qw.effective_group // BLOCK
    codes = qw.codes().numpy().reshape(rows, cols // BLOCK, BLOCK)
    scale = qw.scale.float().numpy().repeat(rep, axis=1)
    zero = qw.zero.numpy().astype(np.float32).repeat(rep, axis=1)
    return codes, scale, zero


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes -> [..., 16] bytes: low nibble weight j, high nibble weight j + 16."""
    q = q.astype(np.uint8)
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[..., 32] 5-bit codes -> [..., 4] bytes of a little-endian u32 holding bit 4 of each."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=-1, dtype=np.uint32)[..., None].view(np.uint8)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def carry(qw: QuantizedWeight, qtype: T) -> np.ndarray:
    """The GGUF blocks holding qw's integers. -> uint8 [rows, bytes per row]"""
    reason = why_not_carried(qw, qtype)
    if reason is not None:
        raise ValueError(reason)
    rows = qw.shape[0]
    codes, scale, zero = _block_params(qw)
    bits, _, has_min = CARRIABLE[qtype]
    if qtype == T.Q8_0:
        qs = (codes.astype(np.int16) - zero[..., None].astype(np.int16)).astype(np.int8)
        parts = [_f16_bytes(scale), qs.view(np.uint8)]
    else:
        offset = 1 << (bits - 1)  # w = d * (q - offset) for the symmetric types
        if has_min:  # w = d * q + m with m = -s * z
            parts = [_f16_bytes(scale), _f16_bytes(-scale * zero)]
        else:
            if not np.all(zero == offset):
                raise ValueError("symmetric record with a zero point other than 2^(bits-1)")
            parts = [_f16_bytes(scale)]
        if bits == 5:
            parts.append(_high_bits(codes))
        parts.append(_nibbles(codes))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def permute_rows(data: np.ndarray | torch.Tensor, n_head: int):
    """Q/K rows from Hugging Face's rotate-half layout to GGUF's interleaved rotary pairs
    (rows [head, 2, half] -> [head, half, 2]); works on float weights and block rows alike."""
    rows = data.shape[0]
    shaped = data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:])
    if isinstance(shaped, torch.Tensor):
        return shaped.transpose(1, 2).reshape(data.shape)
    return shaped.swapaxes(1, 2).reshape(data.shape)


# ---- K-quants: super-blocks of 256 (ggml-common.h block_q2_K .. block_q6_K) ----------------
K_TYPES: dict[T, str] = {
    T.Q2_K: "q2_k",
    T.Q3_K: "q3_k",
    T.Q4_K: "q4_k",
    T.Q5_K: "q5_k",
    T.Q6_K: "q6_k",
}
# The type of a tensor whose rows are not whole super-blocks: what the llama-quantize in use here
# writes (Q4_0 for Q2_K/Q3_K, as its Q3_K_M file of SmolLM2 shows; newer llama.cpp may write
# IQ4_NL there). quant/common.py K_FALLBACK_GRID quantizes such layers on these grids.
K_FALLBACK: dict[T, T] = {
    T.Q2_K: T.Q4_0,
    T.Q3_K: T.Q4_0,
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
    T.IQ4_XS: T.IQ4_NL,
}


def why_not_k(qw: QuantizedWeight, qtype: T) -> str | None:
    """None when qw is a K-quant record of exactly qtype, else the reason."""
    if qw.kquant is None:
        return f"the grid is not a {qtype.name} super-block grid (quantize with --gguf-compatible)"
    if qw.kquant != K_TYPES[qtype]:
        return f"{qw.kquant.upper()} codes do not fit {qtype.name}"
    return None


def _crumbs(q: np.ndarray, nbits: int, per_byte: int) -> np.ndarray:
    """[..., per_byte, L] small integers -> [..., L] bytes, element k at bits k*nbits."""
    out = np.zeros(q.shape[:-2] + q.shape[-1:], dtype=np.uint8)
    for k in range(per_byte):
        out |= (q[..., k, :].astype(np.uint8) & ((1 << nbits) - 1)) << (k * nbits)
    return out


def _scale_min_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins [..., 8] -> ggml's 12 packed bytes (get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    return out


def _scales_q3k(sc: np.ndarray) -> np.ndarray:
    """Sixteen signed 6-bit scales [..., 16] -> Q3_K's 12 bytes (stored as sc + 32)."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:8] = (u[..., 0:8] & 0x0F) | ((u[..., 8:16] & 0x0F) << 4)
    high = (u >> 4).reshape((*u.shape[:-1], 4, 4))  # [..., j // 4, j % 4]
    out[..., 8:12] = _crumbs(high, 2, 4)
    return out


def _k_parts(qw: QuantizedWeight) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Codes [blocks, 256] and super-block parameters per block, row-major over the weight."""
    rows, cols = qw.shape
    n = rows * cols // 256
    q = qw.codes().numpy().reshape(n, 256)
    sb = {k: v.numpy().reshape(n, -1) for k, v in qw.superblock.items()}
    return q, sb, rows


def _low_crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit planes of Q2_K/Q3_K: weight n*128 + j*32 + l at bits 2j of byte n*32 + l."""
    return _crumbs((q & 3).reshape(-1, 2, 4, 32), 2, 4).reshape(-1, 64)


def _nibble_pairs(q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles: chunk c of 64, byte c*32 + l = weight c*64 + l | c*64 + 32 + l."""
    c = (q & 0x0F).astype(np.uint8).reshape(-1, 4, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)


def _k_blocks(qw: QuantizedWeight, qtype: T) -> list[np.ndarray]:
    """The byte fields of every super-block of qw, in ggml's struct order."""
    q, sb, _ = _k_parts(qw)
    d = _f16_bytes(sb["d"][:, 0])
    if qtype == T.Q2_K:
        scales = (sb["sc"].astype(np.uint8) & 0x0F) | (sb["mn"].astype(np.uint8) << 4)
        return [scales, _low_crumbs(q), d, _f16_bytes(sb["dmin"][:, 0])]
    if qtype == T.Q3_K:
        hmask = _crumbs((q >> 2).reshape(-1, 8, 32), 1, 8)
        return [hmask, _low_crumbs(q), _scales_q3k(sb["sc"]), d]
    if qtype == T.Q6_K:
        c = q.reshape(-1, 2, 4, 32)  # [block, half, quarter, l]
        ql = (c[:, :, 0:2] & 0x0F) | ((c[:, :, 2:4] & 0x0F) << 4)  # [block, half, 2, 32]
        qh = _crumbs((c >> 4).astype(np.uint8), 2, 4)  # [block, half, 32]
        scales = sb["sc"].astype(np.int8).view(np.uint8)
        return [ql.reshape(-1, 128), qh.reshape(-1, 64), scales, d]
    head = [d, _f16_bytes(sb["dmin"][:, 0]), _scale_min_k4(sb["sc"], sb["mn"])]
    if qtype == T.Q5_K:
        qh = _crumbs((q >> 4).astype(np.uint8).reshape(-1, 8, 32), 1, 8)
        return [*head, qh, _nibble_pairs(q)]
    return [*head, _nibble_pairs(q)]


def quantize_k(w: torch.Tensor, qtype: T) -> np.ndarray:
    """Float weights [rows, cols] in a K type, on tinyllm's searched grid (no calibration)."""
    spec = kspec(K_TYPES[qtype])
    superblock = fit_kgrid(w.float(), spec)
    codes = quantize_on(w.float(), *derive(superblock, spec), spec)
    return carry_k(QuantizedWeight.from_kquant(codes, spec.name, superblock), qtype)


def carry_k(qw: QuantizedWeight, qtype: T) -> np.ndarray:
    """The GGUF super-blocks holding a K-quant record. -> uint8 [rows, bytes per row]"""
    reason = why_not_k(qw, qtype)
    if reason is not None:
        raise ValueError(reason)
    return np.concatenate(_k_blocks(qw, qtype), axis=-1).reshape(qw.shape[0], -1)


# ---- IQ4_NL: a float16 scale and 32 four-bit table indices (ggml-common.h block_iq4_nl) ------


def why_not_iq4nl(qw: QuantizedWeight) -> str | None:
    """None when qw is an IQ4_NL record (kernels/iq4grid.py), else the reason."""
    if not is_iq4nl(qw.codebook, qw.group_size):
        return "the grid is not IQ4_NL's table (quantize with --gguf-compatible iq4_nl)"
    if qw.perm is not None:
        return "columns are permuted (act-order without static groups)"
    return None


def carry_iq4nl(qw: QuantizedWeight) -> np.ndarray:
    """IQ4_NL blocks of an IQ4_NL record: d, then byte j = index j | index j + 16 << 4.
    -> uint8 [rows, blocks * 18]"""
    rows, cols = qw.shape
    q = qw.codes().numpy().reshape(rows, cols // BLOCK, 2, BLOCK // 2).astype(np.uint8)
    d = qw.scale.numpy().astype(np.float16).reshape(rows, cols // BLOCK, 1).view(np.uint8)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def quantize_iq4nl(value: torch.Tensor) -> np.ndarray:
    """A float tensor [rows, cols] as IQ4_NL blocks (the same block search, unweighted)."""
    w = value.float().reshape(-1, value.shape[-1])
    return carry_iq4nl(QuantizedWeight.from_iq4nl(*fit_iq4nl(w))).reshape(*value.shape[:-1], -1)


# ---- IQ4_XS: per 256 weights d:f16, scales_h:u16, scales_l:4 bytes, qs:128 bytes -------------
# (ggml-common.h block_iq4_xs) block b's scale is d * (l_b - 32), l_b a 6-bit number: its low 4
# bits in nibble b % 2 of scales_l[b / 2], its high 2 bits at bit 2b of scales_h; qs as IQ4_NL's.


def why_not_iq4xs(qw: QuantizedWeight) -> str | None:
    """None when qw is an IQ4_NL record whose block scales lie on IQ4_XS's super-block grid."""
    reason = why_not_iq4nl(qw)
    if reason is not None:
        return reason.replace("iq4_nl", "iq4_xs")
    if qw.shape[1] % 256:
        return f"rows of {qw.shape[1]} are not whole super-blocks of 256"
    if iq4xs_superblocks(qw.scale.reshape(qw.shape[0], -1)) is None:
        return "the block scales are not on a super-block's 6-bit grid (--gguf-compatible iq4_xs)"
    return None


def carry_iq4xs(qw: QuantizedWeight) -> np.ndarray:
    """IQ4_XS super-blocks of an IQ4_XS record. -> uint8 [rows, supers * 136]"""
    reason = why_not_iq4xs(qw)
    if reason is not None:
        raise ValueError(reason)
    rows, cols = qw.shape
    supers = cols // 256
    d, k = iq4xs_superblocks(qw.scale.reshape(rows, -1))
    d = d.numpy().reshape(rows, supers, 1).view(np.uint8)  # [rows, supers, 2]
    level = (k + 32).numpy().astype(np.uint16)  # [rows, supers, 8], 6 bits each
    low = (level & 0xF).astype(np.uint8)
    scales_l = low[..., 0::2] | (low[..., 1::2] << 4)  # [rows, supers, 4]
    shifts = (2 * np.arange(8)).astype(np.uint16)
    scales_h = ((level >> 4) << shifts).sum(-1, dtype=np.uint16)  # [rows, supers]
    scales_h = scales_h.reshape(rows, supers, 1).view(np.uint8)  # [rows, supers, 2]
    q = qw.codes().numpy().reshape(rows, supers, 8, 2, BLOCK // 2).astype(np.uint8)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(rows, supers, 128)
    return np.concatenate([d, scales_h, scales_l, qs], axis=-1).reshape(rows, -1)


def quantize_iq4xs(value: torch.Tensor) -> np.ndarray:
    """A float tensor [rows, cols] (cols a multiple of 256) as IQ4_XS super-blocks."""
    w = value.float().reshape(-1, value.shape[-1])
    qw = QuantizedWeight.from_iq4nl(*fit_iq4xs(w))
    return carry_iq4xs(qw).reshape(*value.shape[:-1], -1)
