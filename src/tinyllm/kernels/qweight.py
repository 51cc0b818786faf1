"""`QuantizedWeight`: the one record of a quantized weight, read by modules, checkpoints, export."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyllm.kernels.iq4grid import IQ4NL_GROUP, iq4nl_codebook
from tinyllm.kernels.kgrid import derive, kspec
from tinyllm.kernels.primitives import dequantize_codes, pack_bits, unpack_bits


@dataclass
class QuantizedWeight:
    """Packed integer codes plus what is needed to turn them back into weights.

    w[r, c] = scale[r, c // g] * (code[r, c] - zero[r, c // g]) for affine grids, or
    w[r, c] = scale[r, c // g] * codebook[code[r, c]] when a codebook is given (NF4).
    `perm`, if set, is the column order the codes are stored in (act-order without static groups).
    A K-quant record (`kquant` names the type, kernels/kgrid.py) keeps its groups' scales and
    mins as llama.cpp does, quantized per super-block of 256 (`superblock`: d, sc, and dmin,
    mn for types with mins); in memory `scale` (float32) and `offset` hold their exact values
    and w[r, c] = scale * (code - zero) - offset, ggml's dequantization bit for bit.
    """

    packed: torch.Tensor  # uint8 bit stream of the codes, row-major over [out, in]
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # uint8 [out, groups]; 2^(bits-1) everywhere when sym
    perm: torch.Tensor | None = None  # int64 [in]
    codebook: torch.Tensor | None = None  # float32 [2^bits]
    # Double quantization of the scales (NF4): int8 codes, one float32 scale per 256 of them and
    # their float32 mean. When set, this is what is stored; `scale` holds its exact dequantized
    # value in memory.
    scale_dq: dict[str, torch.Tensor] | None = None
    kquant: str | None = None  # K-quant type ("q4_k", ...) whose super-blocks hold the grid
    superblock: dict[str, torch.Tensor] | None = None  # its d, sc (dmin, mn) as stored
    offset: torch.Tensor | None = None  # float32 [out, groups], subtracted (K-quant mins)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        bits: int,
        group_size: int,
        sym: bool,
        perm: torch.Tensor | None = None,
        codebook: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        return cls(
            packed=pack_bits(codes, bits),
            shape=(int(codes.shape[0]), int(codes.shape[1])),
            bits=bits,
            group_size=group_size,
            sym=sym,
            scale=scale.to(torch.float16).contiguous(),
            zero=zero.to(torch.uint8).contiguous(),
            perm=perm,
            codebook=codebook,
        )

    @classmethod
    def from_iq4nl(cls, codes: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
        """An IQ4_NL record (kernels/iq4grid.py): table indices [out, in] and block scales.
        Scales on IQ4_XS's super-block grid (d * k: more bits than float16 holds) stay float32,
        exact, in memory and in the checkpoint."""
        qw = cls.from_codes(
            codes,
            scale,
            torch.full(scale.shape, 8, dtype=torch.uint8),
            bits=4,
            group_size=IQ4NL_GROUP,
            sym=True,
            codebook=iq4nl_codebook(),
        )
        if not torch.equal(qw.scale.float(), scale.float()):
            qw.scale = scale.float().contiguous()
        return qw

    @classmethod
    def from_kquant(
        cls, codes: torch.Tensor, kquant: str, superblock: dict[str, torch.Tensor]
    ) -> QuantizedWeight:
        """A K-quant record: codes [out, in] and the type's super-block parameters."""
        spec = kspec(kquant)
        scale, offset = derive(superblock, spec)
        return cls(
            packed=pack_bits(codes, spec.bits),
            shape=(int(codes.shape[0]), int(codes.shape[1])),
            bits=spec.bits,
            group_size=spec.sub,
            sym=spec.signed,
            scale=scale.contiguous(),
            zero=torch.full(scale.shape, spec.zero, dtype=torch.uint8),
            kquant=kquant,
            superblock={k: v.contiguous() for k, v in superblock.items()},
            offset=None if spec.signed else offset.contiguous(),
        )

    @property
    def groups(self) -> int:
        return 1 if self.group_size == -1 else self.shape[1] // self.group_size

    @property
    def effective_group(self) -> int:
        return self.shape[1] if self.group_size == -1 else self.group_size

    def codes(self) -> torch.Tensor:
        """Unpacked codes. -> uint8 [out, in] (in stored column order)"""
        out, inp = self.shape
        return unpack_bits(self.packed, self.bits, out * inp).reshape(out, inp)

    def dequantize(self) -> torch.Tensor:
        """The float weight, columns back in the original order. -> float32 [out, in]"""
        q = self.codes()
        if self.codebook is not None:
            values = self.codebook[q.long()]
            g = values.reshape(self.shape[0], self.groups, -1)
            w = (g * self.scale.float()[..., None]).reshape(self.shape)
        else:
            w = dequantize_codes(q, self.scale, self.zero, self.effective_group)
            if self.offset is not None:
                w = (w.reshape(self.shape[0], self.groups, -1) - self.offset[..., None]).reshape(
                    self.shape
                )
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Row blocks of this weight as separate records (a stacked q/k/v back into q, k, v)."""
        codes = self.codes()
        out, start = [], 0
        for n in sizes:
            rows = slice(start, start + n)
            if self.kquant is not None:
                part = {k: v[rows] for k, v in self.superblock.items()}
                out.append(QuantizedWeight.from_kquant(codes[rows], self.kquant, part))
                start += n
                continue
            out.append(
                QuantizedWeight.from_codes(
                    codes[rows],
                    self.scale[rows],
                    self.zero[rows],
                    bits=self.bits,
                    group_size=self.group_size,
                    sym=self.sym,
                    perm=self.perm,
                    codebook=None if self.codebook is None else self.codebook.clone(),
                )
            )
            if self.scale.dtype == torch.float32:  # exact IQ4_XS scales stay exact
                out[-1].scale = self.scale[rows].contiguous()
            start += n
        if start != self.shape[0]:
            raise ValueError(f"row sizes {sizes} do not add up to {self.shape[0]}")
        return out

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantize only the rows `idx` (an embedding lookup). -> float32 [len(idx), in]"""
        out, inp = self.shape
        if self.perm is not None or (inp * self.bits) % 8 or self.offset is not None:
            return self.dequantize()[idx]
        packed = self.packed.view(out, inp * self.bits // 8)[idx].reshape(-1)
        q = unpack_bits(packed, self.bits, idx.numel() * inp).reshape(-1, inp)
        scale = self.scale[idx]
        if self.codebook is not None:
            g = self.codebook[q.long()].reshape(q.shape[0], self.groups, -1)
            return (g * scale.float()[..., None]).reshape(q.shape)
        return dequantize_codes(q, scale, self.zero[idx], self.effective_group)

    def to_(self, device: torch.device) -> None:
        """Move every tensor of the record to `device`, in place (modules sharing the record,
        a tied embedding and head, keep sharing it)."""
        for name in ("packed", "scale", "zero", "perm", "codebook", "offset"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if self.scale_dq is not None:
            self.scale_dq = {k: v.to(device) for k, v in self.scale_dq.items()}
        if self.superblock is not None:
            self.superblock = {k: v.to(device) for k, v in self.superblock.items()}

    def storage_bits(self) -> int:
        """Bits stored for this weight: codes, scales, zero points (asymmetric), codebook."""
        bits = self.shape[0] * self.shape[1] * self.bits
        if self.kquant is not None:  # as ggml stores it
            return round(self.shape[0] * self.shape[1] * kspec(self.kquant).bpw)
        if self.scale_dq is not None:
            bits += sum(t.numel() * t.element_size() * 8 for t in self.scale_dq.values())
        elif self.scale.dtype == torch.float32 and self.codebook is not None:
            bits += self.scale.numel() * 8  # IQ4_XS: 6 bits per 32, a float16 per 256
        else:
            bits += self.scale.numel() * 16
        if not self.sym and self.codebook is None:
            bits += self.zero.numel() * self.bits
        if self.codebook is not None:
            bits += self.codebook.numel() * 32
        return bits

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors file."""
        out = {f"{prefix}.packed": self.packed, f"{prefix}.zero": self.zero}
        if self.superblock is not None:  # scale and offset are derived from these
            out.update({f"{prefix}.kq.{k}": v for k, v in self.superblock.items()})
            return out
        if self.scale_dq is not None:
            out.update({f"{prefix}.scale_dq.{k}": v for k, v in self.scale_dq.items()})
        else:
            out[f"{prefix}.scale"] = self.scale
        if self.perm is not None:
            out[f"{prefix}.perm"] = self.perm
        if self.codebook is not None:
            out[f"{prefix}.codebook"] = self.codebook
        return out

    def meta(self) -> dict:
        out = {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
        }
        if self.kquant is not None:
            out["kquant"] = self.kquant
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, meta: dict
    ) -> QuantizedWeight:
        if meta.get("kquant") is not None:
            keys = [k for k in ("d", "sc", "dmin", "mn") if f"{prefix}.kq.{k}" in tensors]
            sb = {k: tensors[f"{prefix}.kq.{k}"] for k in keys}
            codes = unpack_bits(
                tensors[f"{prefix}.packed"], meta["bits"], meta["shape"][0] * meta["shape"][1]
            )
            return cls.from_kquant(codes.reshape(meta["shape"]), meta["kquant"], sb)
        dq = None
        if f"{prefix}.scale_dq.codes" in tensors:
            dq = {k: tensors[f"{prefix}.scale_dq.{k}"] for k in ("codes", "absmax", "mean")}
            groups = 1 if meta["group_size"] == -1 else meta["shape"][1] // meta["group_size"]
            scale = dequantize_scales(dq).reshape(meta["shape"][0], groups)
        else:
            scale = tensors[f"{prefix}.scale"]
        return cls(
            packed=tensors[f"{prefix}.packed"],
            shape=tuple(meta["shape"]),
            bits=meta["bits"],
            group_size=meta["group_size"],
            sym=meta["sym"],
            scale=scale,
            zero=tensors[f"{prefix}.zero"],
            perm=tensors.get(f"{prefix}.perm"),
            codebook=tensors.get(f"{prefix}.codebook"),
            scale_dq=dq,
        )


DQ_BLOCK = 256  # scales per second-level block


def double_quantize_scales(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scales -> int8 codes of (scale - mean), with one absmax per block of 256 (QLoRA's double
    quantization, with an 8-bit integer grid where the paper uses FP8)."""
    flat = scale.float().reshape(-1)
    mean = flat.mean()
    centred = flat - mean
    pad = (-centred.numel()) % DQ_BLOCK
    blocks = torch.cat([centred, centred.new_zeros(pad)]).reshape(-1, DQ_BLOCK)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    codes = (blocks / absmax[:, None] * 127).round().clamp(-127, 127).to(torch.int8)
    return {
        "codes": codes.reshape(-1)[: flat.numel()].contiguous(),
        "absmax": absmax,
        "mean": mean.reshape(1),
    }


def dequantize_scales(dq: dict[str, torch.Tensor]) -> torch.Tensor:
    codes = dq["codes"].float()
    pad = (-codes.numel()) % DQ_BLOCK
    blocks = torch.cat([codes, codes.new_zeros(pad)]).reshape(-1, DQ_BLOCK)
    values = blocks * dq["absmax"][:, None] / 127 + dq["mean"]
    return values.reshape(-1)[: codes.numel()]
