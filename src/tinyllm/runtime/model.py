"""A lean decoder forward for Llama-like families and Gemma 3 over a paged KV cache.

It runs the modules of a loaded model directly (embedding, norms' weights, the linear layers
whatever they are: fp32 `nn.Linear`, packed `QuantLinear`, pruned shapes) but replaces
transformers' per-call machinery with one flat batch: the new tokens of every running sequence
are concatenated (`[T, hidden]`), every linear runs once per step on all of them, and only
attention is per group: all decoding sequences together (one gather of their cached keys and a
masked batched attention), each prefill chunk on its own (causal with an offset).

Families are data: the family table (models/families.py, `runtime=True`) names each family's
norms, embedding and head; the config says the rest. Llama, Qwen2 (q/k/v biases live in the
linears), Mistral (a sliding window on every layer), TinyLlama (a Llama) and Gemma 3 (per-head
q/k norms, norms after attention and after the MLP, norms scaling by 1 + w, GELU, sliding
windows and their own RoPE base on the layers `layer_types` marks, an attention scale from
`query_pre_attn_scalar`) share this code. Other families (and the RoPE variants and settings
`unsupported_reason` names) are not refused: the engine runs them on `HFRuntime`, the
transformers model itself, and logs a warning that says why.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.kernels import native
from tinyllm.kernels.layouts import NATIVE_MAX_ROWS, Q4Native, Q8Native
from tinyllm.models.anatomy import analyze
from tinyllm.models.families import FAMILIES, Family, supporting
from tinyllm.runtime.kv_cache import NONE, CacheShape, PagedKVCache
from tinyllm.runtime.workspace import Workspace
from tinyllm.util.device import module_device

# RoPE variants whose frequencies do not depend on the sequence length (the module's inv_freq
# already holds the scaled frequencies). "dynamic" and "longrope" change with length: fallback.
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


# activations the lean forward runs (config.hidden_act / hidden_activation), applied in place
ACTIVATIONS = {
    "silu": lambda x: F.silu(x, inplace=True),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu": lambda x: torch.ops.aten.gelu_(x),
}

ACT_IDS = {"silu": 0, "gelu_pytorch_tanh": 1, "gelu": 2}  # decode_block's activation codes


def _rope_types(cfg: object) -> list[str]:
    """The RoPE kind of every attention type (Gemma 3 keeps one per layer type)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return [v.get("rope_type", "default") for v in params.values()]
    return [params.get("rope_type", "default")]


def _activation(cfg: object) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the lean forward cannot run this model, or None if it can."""
    cfg = model.config
    fam = getattr(cfg, "model_type", "?")
    if fam not in FAMILIES or not FAMILIES[fam].runtime:
        supported = ", ".join(supporting("runtime"))
        return f"model family '{fam}' is not in the runtime's table ({supported})"
    rope = next((r for r in _rope_types(cfg) if r not in STATIC_ROPE), None)
    if rope is not None:
        return f"RoPE type '{rope}' depends on sequence length"
    if getattr(cfg, "use_sliding_window", False) and FAMILIES[fam].window == "refuse":
        return f"{fam} with a sliding window"
    if _activation(cfg) not in ACTIVATIONS:
        return f"activation '{_activation(cfg)}'"
    for what in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if getattr(cfg, what, None):
            return f"{what} set"
    return None


class Fused:
    """Linears that read the same input (q/k/v; gate/up) as one 4-bit kernel call.

    Their packed weights are concatenated along the output rows and each module's buffers are
    replaced by views into the concatenation, so nothing is added to memory and the modules
    still compute exactly what they did. Prefill chunks run through the same kernel (no float
    copy of a weight is made). Anything the kernel does not take (other kernels, mixed group
    sizes, biases) runs the modules one by one.

    With `int8_act`, the call quantizes its input to int8 per block of 32 and runs the integer
    kernel (q4_gemv_i8, AVX512-VNNI) instead: faster, not exact (see docs/runtime.md).
    """

    def __init__(self, mods: list[nn.Module], int8_act: bool = False) -> None:
        self.mods = mods
        self.sizes = [m.out_features for m in mods]
        self.group = _common_q4_group(mods)
        if self.group is None:
            return
        self.i8 = int8_act and Q4Native.i8_supported(self.group)
        self.buffers = {}
        if len(mods) == 1:
            self.buffers = dict(mods[0].packed())
            return
        for name in Q4Native.BUFFERS:
            whole = torch.cat([getattr(m, name) for m in mods])  # [sum N / 16, ...]
            start = 0
            for m in mods:
                n = getattr(m, name).shape[0]
                m._buffers[name] = whole[start : start + n]
                start += n
            self.buffers[name] = whole

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """[T, in] -> [T, out_i] each; the kernel writes into `out` [T, sum out_i] if given."""
        if self.group is None:
            return [m(x) for m in self.mods]
        # any number of rows, prefill too: the kernel converts the codes tile by tile, never
        # a float copy of the weight (1.1x an unpacked float GEMM at 512 rows; --int8-act 1.4x)
        y = Q4Native.gemv(x, self.buffers, self.group, i8=self.i8, out=out)
        return list(y.split(self.sizes, dim=-1)) if len(self.mods) > 1 else [y]


def _common_q4_group(mods: list[nn.Module]) -> int | None:
    if any(
        not isinstance(getattr(m, "layout", None), Q4Native) or m.bias is not None for m in mods
    ):
        return None
    groups = {m.qweight.effective_group for m in mods}
    ins = {m.in_features for m in mods}
    return groups.pop() if len(groups) == 1 and len(ins) == 1 else None


# the norms of a block the forward reads, by family role (Layer fields)
NORM_ROLES = ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm", "post_mlp_norm")


@dataclass
class Layer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: Fused
    o: Fused
    gate_up: Fused
    down: Fused
    heads: int
    kv_heads: int
    window: int | None = None  # keys visible to a query: its last `window` positions
    rope: str = ""  # which RoPE table (Gemma 3: the layer type)
    q_norm: torch.Tensor | None = None  # per-head norms of q and k (Gemma 3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # norms of the attention and MLP outputs
    post_mlp_norm: torch.Tensor | None = None


@dataclass
class DecodeGroup:
    """Sequences adding one token each: attention over their padded cached keys."""

    rows: torch.Tensor  # [B] rows of the flat batch
    ctx: torch.Tensor  # [B, Lmax] slots of each sequence's keys (padding repeats slot 0)
    mask: torch.Tensor | None  # [B, 1, 1, Lmax] True where a key is real and visible; None in
    # a static decode-only batch (the native attention reads lengths and starts only)
    lengths: torch.Tensor  # [B] keys per sequence (its new token's included)
    starts: torch.Tensor  # [B] first visible key (sliding window), else 0
    all_rows: bool  # the decode group is the whole flat batch, in order

    def to(self, device: torch.device) -> DecodeGroup:
        t = (x.to(device) for x in (self.rows, self.ctx, self.mask, self.lengths, self.starts))
        return DecodeGroup(*t, self.all_rows)  # (a batch built for the native CPU path stays)


@dataclass
class PrefillChunk:
    """A run of prompt tokens of one sequence: causal attention over its whole context."""

    rows: slice
    ctx: torch.Tensor  # [L] slots of the sequence's keys, this chunk's included
    mask: torch.Tensor  # [n, L] bool
    causal: bool = False  # the mask is plain causal over n = L keys (a chunk from position 0)

    def to(self, device: torch.device) -> PrefillChunk:
        return PrefillChunk(self.rows, self.ctx.to(device), self.mask.to(device), self.causal)


@dataclass
class FlatBatch:
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] where each token's K/V is written
    logit_rows: torch.Tensor  # [S] rows whose next-token logits are wanted
    decode: DecodeGroup | None
    prefills: list[PrefillChunk]
    spans: list[tuple[int, slice]]  # (sequence id, its rows), in row order
    argmax_only: bool = False  # every logits row is used for its argmax alone (greedy)

    def to(self, device: torch.device) -> FlatBatch:
        """The batch with its tensors on `device` (the engine builds it on the CPU)."""
        if device.type == "cpu":
            return self
        t = (x.to(device) for x in (self.tokens, self.positions, self.slots, self.logit_rows))
        decode = None if self.decode is None else self.decode.to(device)
        prefills = [p.to(device) for p in self.prefills]
        return FlatBatch(*t, decode, prefills, self.spans, self.argmax_only)


@dataclass
class BatchItem:
    """One sequence's share of a step: its new tokens and where their keys go."""

    seq_id: int
    tokens: list[int]  # the tokens to compute now
    start: int  # the position of the first
    slots: torch.Tensor  # [len(tokens)] cache slots of their K/V (reserved)
    logits: int  # how many of its last rows' next-token logits are wanted (0 to all)


def _block_l1(packed: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per block of 32 inputs, the largest L1 norm of any row of a q8 head's 32 weights
    (|s_t| * sum |q_tk|): q8_argmax_fix's error bound. -> float32 [in / 32]"""
    codes, scale = packed["w_q8"], packed["w_q8_scale"]  # [N/16, K, 16], [N/16, 16]
    nb, k, lanes = codes.shape
    top = torch.zeros(k // 32)
    for b in range(0, nb, 1024):  # in chunks: no int16 copy of a whole large head
        c = codes[b : b + 1024].to(torch.int16).abs().view(-1, k // 32, 32, lanes).sum(2)
        l1 = c.float() * scale[b : b + 1024, None, :].abs()
        top = torch.maximum(top, l1.amax(dim=(0, 2)))
    return top * (1 + 2**-20)  # the products' own rounding, outward


def flat_batch(items: list[BatchItem], cache: PagedKVCache, runtime: object) -> FlatBatch:
    """The flat batch of a step (`runtime.visible` masks prefill chunks): a one-token item joins
    the decode group, a longer one is a prefill chunk over the sequence's cached keys."""
    ws = getattr(runtime, "ws", None)
    if ws is not None and all(len(it.tokens) == 1 for it in items):
        return _decode_batch(items, cache, ws)
    tokens, positions, logit_rows, spans = [], [], [], []
    decoders: list[tuple[int, torch.Tensor]] = []  # (row, the sequence's slots)
    prefills: list[PrefillChunk] = []
    row = 0
    for it in items:
        n, start = len(it.tokens), it.start
        tokens += it.tokens
        positions += range(start, start + n)
        spans.append((it.seq_id, slice(row, row + n)))
        ctx = cache.slots(it.seq_id)  # [start + n]
        logit_rows += range(row + n - it.logits, row + n)
        if n == 1:
            decoders.append((row, ctx))
        else:
            mask = runtime.visible(torch.arange(start, start + n), start + n)
            prefills.append(PrefillChunk(slice(row, row + n), ctx, mask, causal=start == 0))
        row += n
    return FlatBatch(
        torch.tensor(tokens),
        torch.tensor(positions),
        torch.cat([it.slots for it in items]),
        torch.tensor(logit_rows, dtype=torch.long),
        _decode_group(decoders, row),
        prefills,
        spans,
    )


def _decode_batch(items: list[BatchItem], cache: PagedKVCache, ws: Workspace) -> FlatBatch:
    """A decode-only batch written into the workspace (a runtime with one runs the native CPU
    path): no tensor is allocated, the fields are filled through a numpy view of the buffer."""
    b = len(items)
    meta = ws.get("batch", 7, b, torch.long)
    m = meta.numpy()  # tokens, positions, slots, logit rows, lengths, window starts, rows
    ctx = ws.grid("ctx", b, max(it.start for it in items) + 1)
    s = 0
    for r, it in enumerate(items):
        keys = cache.slots(it.seq_id)  # [start + 1], the new token's slot last
        ctx[r, : it.start + 1].copy_(keys)
        m[0, r], m[1, r], m[2, r] = it.tokens[0], it.start, int(it.slots[0])
        m[4, r], m[5, r], m[6, r] = it.start + 1, 0, r
        if it.logits:
            m[3, s] = r
            s += 1
    decode = DecodeGroup(meta[6], ctx, None, meta[4], meta[5], all_rows=True)
    spans = [(it.seq_id, slice(r, r + 1)) for r, it in enumerate(items)]
    return FlatBatch(meta[0], meta[1], meta[2], meta[3, :s], decode, [], spans)


def _decode_group(decoders: list[tuple[int, torch.Tensor]], total_rows: int) -> DecodeGroup | None:
    if not decoders:
        return None
    lens = torch.tensor([len(c) for _, c in decoders])
    ctx = torch.nn.utils.rnn.pad_sequence([c for _, c in decoders], batch_first=True)
    starts = torch.zeros_like(lens)  # sliding-window layers narrow it (_windowed)
    kpos = torch.arange(ctx.shape[1])[None, :]
    mask = kpos < lens[:, None]  # [B, Lmax]
    rows = [r for r, _ in decoders]
    all_rows = rows == list(range(total_rows))
    return DecodeGroup(torch.tensor(rows), ctx, mask[:, None, None, :], lens, starts, all_rows)


class HFRuntime:
    """The fallback for families the lean forward does not know: the transformers model itself,
    one sequence at a time, each with its own transformers KV cache. The paged cache still
    does the accounting (admission, limits, leaks), but holds no tensors that are read."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model = model
        self.device = module_device(model)
        self.caches: dict[int, object] = {}
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048))
        heads = cfg.num_attention_heads
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        self.kv_heads = tuple([kv] * int(cfg.num_hidden_layers))

    def cache_shape(self, dtype: torch.dtype = torch.float32) -> CacheShape:
        return CacheShape(len(self.kv_heads), self.kv_heads, self.head_dim, dtype)

    def visible(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        return torch.arange(k_len)[None, :] <= q_pos[:, None]

    def release(self, seq_id: int) -> None:
        self.caches.pop(seq_id, None)

    @torch.inference_mode()
    def forward(self, batch: FlatBatch, cache: PagedKVCache) -> torch.Tensor:
        from transformers import DynamicCache

        wanted = set(batch.logit_rows.tolist())
        batch = batch.to(self.device)
        out = []
        for seq_id, rows in batch.spans:
            if int(batch.positions[rows.start]) == 0:  # new, or recomputing after preemption
                self.caches[seq_id] = DynamicCache(config=self.model.config)
            ids = batch.tokens[rows][None, :]
            pos = batch.positions[rows][None, :]
            logits = self.model(input_ids=ids, position_ids=pos, use_cache=True,
                                past_key_values=self.caches[seq_id]).logits  # fmt: skip
            if rows.stop - 1 in wanted:
                out.append(logits[0, -1].float())
        return torch.stack(out) if out else torch.empty(0, 0)


class LeanRuntime:
    """Holds references to the model's modules (nothing copied but the norm weights of a family
    whose norms scale by offset + w) and runs flat batches."""

    def release(self, seq_id: int) -> None:
        """Nothing to drop: the sequence's keys live in the paged cache."""

    def __init__(self, model: nn.Module, int8_act: bool = False, static: bool = False) -> None:
        """`static`: run in a preallocated workspace (runtime/workspace.py; the native CPU path
        only): the logits a forward returns are then valid until the next forward."""
        self.int8_act = int8_act
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(reason)
        cfg = model.config
        fam = self.fam = FAMILIES[cfg.model_type]
        self.model = model
        self.device = module_device(model)
        self.embed = model.get_submodule(fam.embed)
        self.final_norm = self._norm_weight(model.get_submodule(fam.final_norm))
        self.head = model.get_submodule(fam.head)
        self.eps = float(cfg.rms_norm_eps)
        self.head_dim = int(
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        )
        self.scale = float(getattr(cfg, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        self.act = ACTIVATIONS[_activation(cfg)]
        softcap = getattr(cfg, "final_logit_softcapping", None)
        self.softcap = _scalar(softcap) if softcap else None
        self.ropes = self._ropes(model.get_submodule("model.rotary_emb"))
        self.layers = self._layers(model, fam)
        self.window = next((ly.window for ly in self.layers if ly.window), None)
        self.vocab = int(cfg.vocab_size)
        # tinyllm's C++ ops for norm, RoPE and decode attention (fp32 CPU tensors only), when
        # they build; elsewhere the same steps run as PyTorch ops
        fp32 = all(t.dtype == torch.float32 for t, _ in self.ropes.values())
        fp32 = fp32 and self.final_norm.dtype == torch.float32
        cpu = self.device.type == "cpu"
        self.fused_ops = cpu and fp32 and native.q4_kernel() is not None
        self.head_i8 = (
            int8_act
            and self.fused_ops
            and isinstance(getattr(self.head, "layout", None), Q8Native)
            and self.head.bias is None
            and Q8Native.i8_supported(self.head.in_features)
        )
        # exact mode, greedy steps: the q8 head runs on int8 activations and the entries that
        # could be the row's maximum are recomputed exactly (kernels' q8_argmax_fix)
        verify = self.fused_ops and not int8_act and not self.head_i8 and self.head.bias is None
        verify = verify and isinstance(getattr(self.head, "layout", None), Q8Native)
        verify = verify and Q8Native.i8_supported(self.head.in_features)
        self.head_l1 = _block_l1(self.head.packed()) if verify else None
        self.argmax_candidates: torch.Tensor | None = None  # the last verified step's, per row
        self.max_positions = int(getattr(cfg, "max_position_embeddings", 2048))
        self.ws = Workspace(self.device) if static and self.fused_ops else None
        self.embed_q8 = self._tied_q8_embedding() if self.fused_ops else None
        self.act_id = ACT_IDS[_activation(cfg)]
        # each layer's constant arguments of the native decode_block, when all of it is native
        self.blocks = [self._block_args(ly) for ly in self.layers] if self.ws else []
        self.fuse_blocks = bool(self.blocks) and all(self.blocks)

    def _block_args(self, ly: Layer) -> tuple | None:
        """(packed linears, group sizes, int8 activations, norms) for decode_block, or None when
        a linear of the layer is not on the 4-bit kernel (it then runs op by op)."""
        fused = (ly.qkv, ly.o, ly.gate_up, ly.down)
        if any(f.group is None for f in fused) or len({f.i8 for f in fused}) != 1:
            return None
        lin = [f.buffers[n] for f in fused for n in Q4Native.BUFFERS]
        norms = [getattr(ly, role) for role in NORM_ROLES]
        norms = [NONE if n is None else n.float().contiguous() for n in norms]
        return lin, [f.group for f in fused], fused[0].i8, norms

    def _tied_q8_embedding(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """A packed embedding tied to a head in the q8 layout: its rows are read from the head's
        codes by one native call (the same floats as its own lookup) -> (codes, scale, mult)."""
        head_qw = getattr(self.head, "qweight", None)
        if head_qw is None or getattr(self.embed, "qweight", None) is not head_qw:
            return None
        if not isinstance(getattr(self.head, "layout", None), Q8Native):
            return None
        packed = self.head.packed()
        return packed["w_q8"], packed["w_q8_scale"], float(self.embed.output_scale)

    def _buf(self, name: str, rows: int, cols: int) -> torch.Tensor | None:
        """The workspace's buffer for this step, or None (ops then allocate their output)."""
        return None if self.ws is None else self.ws.get(name, rows, cols)

    def _norm_weight(self, norm: nn.Module) -> torch.Tensor:
        """The weight a norm multiplies by: its own, or offset + w (Gemma: 1 + w, in float32)."""
        if not self.fam.norm_offset:
            return norm.weight
        return (norm.weight.float() + self.fam.norm_offset).detach()

    @staticmethod
    def _ropes(rotary: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """RoPE frequencies and scaling by table name: "" (one table), or per layer type."""
        if hasattr(rotary, "inv_freq"):
            return {"": (rotary.inv_freq.float(), _scalar(rotary.attention_scaling))}
        return {
            lt: (getattr(rotary, f"{lt}_inv_freq").float(),
                 _scalar(getattr(rotary, f"{lt}_attention_scaling")))
            for lt in rotary.rope_type  # the layer types that have a table
        }  # fmt: skip

    def _layers(self, model: nn.Module, fam: Family) -> list[Layer]:
        anat, cfg = analyze(model), model.config
        types = list(getattr(cfg, "layer_types", None) or [])
        out = []
        for i, block in enumerate(anat.blocks):
            lin = {s.role: s.module for s in anat.block_linears(i)}
            norms = {
                role: self._norm_weight(block.get_submodule(fam.local(role)))
                for role in NORM_ROLES
                if role in fam.roles
            }
            lt = types[i] if types else ""
            window = {
                "config": getattr(cfg, "sliding_window", None),
                "layers": (cfg.sliding_window if lt == "sliding_attention" else None),
            }.get(fam.window)
            out.append(
                Layer(
                    **norms,
                    qkv=Fused([lin["q"], lin["k"], lin["v"]], self.int8_act),
                    o=Fused([lin["o"]], self.int8_act),
                    gate_up=Fused([lin["gate"], lin["up"]], self.int8_act),
                    down=Fused([lin["down"]], self.int8_act),
                    heads=lin["q"].out_features // self.head_dim,
                    kv_heads=lin["k"].out_features // self.head_dim,
                    window=window,
                    rope=lt if lt in self.ropes else "",
                )
            )
        return out

    def cache_shape(self, dtype: torch.dtype = torch.float32) -> CacheShape:
        return CacheShape(
            len(self.layers), tuple(ly.kv_heads for ly in self.layers), self.head_dim, dtype
        )

    def _norm(
        self, x: torch.Tensor, w: torch.Tensor, ops: object = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RMSNorm over the last dim of x [R, D] or [T, H, D]; the native op writes into `out`
        (which may be x itself) when given, the PyTorch ops return a new tensor."""
        if ops is not None:
            return ops.rms_norm(x, w, self.eps, out=out)
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + self.eps))

    def _rope(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos and sin [T, hd] of each RoPE table at the step's positions."""
        out, t = {}, positions.shape[0]
        for name, (inv_freq, scale) in self.ropes.items():
            half = inv_freq.shape[0]
            emb = self._buf(f"rope{name}", t, 2 * half)
            emb = torch.empty(t, 2 * half, device=inv_freq.device) if emb is None else emb
            pos = self._buf("positions", t, 1)  # as float, converted in place
            pos = positions[:, None].float() if pos is None else pos.copy_(positions[:, None])
            torch.mul(pos, inv_freq[None, :], out=emb[:, :half])  # [T, hd/2]
            emb[:, half:].copy_(emb[:, :half])
            cos = torch.cos(emb, out=self._buf(f"cos{name}", t, 2 * half)).mul_(scale)
            out[name] = (cos, torch.sin(emb, out=self._buf(f"sin{name}", t, 2 * half)).mul_(scale))
        return out

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2  # x: [T, heads, hd]; cos/sin: [T, 1, hd]
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, batch: FlatBatch, cache: PagedKVCache) -> torch.Tensor:
        """Logits [S, vocab] for `batch.logit_rows`; writes every new token's K/V to the cache."""
        ops = native.q4_kernel() if self.fused_ops else None
        batch = batch.to(self.device)
        x = self._embed(batch.tokens, ops)  # [T, hidden]
        ropes = self._rope(batch.positions)
        windowed = {w: self._windowed(batch, w, ops) for w in {ly.window for ly in self.layers}}
        d = batch.decode
        decode_only = d is not None and d.all_rows
        if self.fuse_blocks and self.ws is not None and decode_only:  # a native call per block
            self._decode_blocks(x, ropes, windowed, cache, ops)
        else:
            for i, ly in enumerate(self.layers):
                x = self._block(x, i, ly, ropes[ly.rope], windowed[ly.window], cache, ops)
        return self._logits(x, batch.logit_rows, ops, batch.argmax_only)

    def _decode_blocks(
        self, x: torch.Tensor, ropes: dict, windowed: dict, cache: PagedKVCache, ops: object
    ) -> None:
        """Every block of a decode-only step through the native decode_block (what _block
        computes, op for op), x updated in place."""
        bufs = self._block_buffers(x.shape[0])
        for i, ly in enumerate(self.layers):
            lin, groups, i8, norms = self.blocks[i]
            scales = [cache.k_scale[i], cache.v_scale[i]] if cache.k_scale else [NONE, NONE]
            batch = windowed[ly.window]
            d = batch.decode
            ops.decode_block(
                x, lin, groups, i8, norms, self.eps, ly.heads, ly.kv_heads, self.act_id,
                *ropes[ly.rope], [cache.k[i], cache.v[i], *scales], batch.slots, d.ctx,
                d.lengths, d.starts, self.scale, bufs[i],
            )  # fmt: skip

    def _block_buffers(self, t: int) -> list[list[torch.Tensor]]:
        """decode_block's workspace outputs of every layer for a step of t rows (kept while
        the step size and the workspace stay the same)."""
        key = (t, self.ws.grown)
        if getattr(self, "_bufs_key", None) != key:
            hidden, hd, out = self.model.config.hidden_size, self.head_dim, []
            for ly in self.layers:
                qkv, inter = (ly.heads + 2 * ly.kv_heads) * hd, ly.gate_up.sizes[0]
                out.append([self.ws.get(name, t, cols) for name, cols in (
                    ("h", hidden), ("qkv", qkv), ("attn", ly.heads * hd), ("proj", hidden),
                    ("gate_up", 2 * inter), ("act", inter))])  # fmt: skip
            self._bufs, self._bufs_key = out, (t, self.ws.grown)
        return self._bufs

    def _windowed(self, batch: FlatBatch, window: int | None, ops: object) -> FlatBatch:
        d = batch.decode  # the native decode attention reads window starts, not masks
        masks = ops is None or d is None or not d.all_rows
        if self.ws is None or d is None or not window:
            return _windowed(batch, window, masks)
        return _windowed(
            batch, window, masks, self.ws.get(f"starts{window}", len(d.rows), 1, torch.long)
        )

    def _embed(self, tokens: torch.Tensor, ops: object) -> torch.Tensor:
        """The tokens' embeddings [T, hidden] float32 (in the workspace when it has one)."""
        out = self._buf("x", tokens.shape[0], self.model.config.hidden_size)
        if self.embed_q8 is not None:
            codes, scale, mult = self.embed_q8
            return ops.q8_rows(codes, scale, tokens, mult, out=out)
        w = getattr(self.embed, "weight", None)
        plain = isinstance(self.embed, nn.Embedding) and self.embed.max_norm is None
        if out is None or not plain or w.dtype != torch.float32:
            return self.embed(tokens).float().contiguous()
        x = torch.index_select(w, 0, tokens, out=out)
        scale = getattr(self.embed, "embed_scale", None)  # Gemma's scaled embedding
        return x if scale is None else x.mul_(scale)

    def _logits(
        self, x: torch.Tensor, rows: torch.Tensor, ops: object, argmax_only: bool = False
    ) -> torch.Tensor:
        """Final norm and head on the rows whose logits are wanted -> [S, vocab] float32. With
        argmax_only, each row's maximum (and its argmax) is exact; other entries may not be."""
        n, head = rows.shape[0], self.head
        x = torch.index_select(x, 0, rows, out=self._buf("final", n, x.shape[1]))
        x = self._norm(x, self.final_norm, ops, out=x if ops is not None else None)
        out = self._buf("logits", n, head.out_features)
        small = n <= NATIVE_MAX_ROWS and getattr(head, "bias", None) is None
        if argmax_only and self.head_l1 is not None and small:
            logits = self._verified_argmax_head(x, ops, out)
        elif self.head_i8 and small:
            logits = Q8Native.gemv_i8(x, head.packed(), out=out)
        elif ops is not None and small and isinstance(getattr(head, "layout", None), Q8Native):
            packed = head.packed()
            logits = ops.q8_gemv(x, packed["w_q8"], packed["w_q8_scale"], out=out)
        elif out is not None and type(head) is nn.Linear and head.bias is None:
            logits = torch.mm(x, head.weight.t(), out=out)
        else:
            logits = head(x).float()
        if self.softcap is not None:
            logits = logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _verified_argmax_head(self, x: torch.Tensor, ops: object, out: torch.Tensor | None):
        """The q8 head on int8 activations, then q8_argmax_fix: the candidates for each row's
        maximum recomputed exactly (a row with too many, or non-finite input: all of it)."""
        packed, n = self.head.packed(), x.shape[0]
        logits = Q8Native.gemv_i8(x, packed, out=out)
        ws = self.ws
        counts = torch.empty(n, dtype=torch.long) if ws is None else ws.get("fix", n, 1, torch.long)
        counts = counts.view(n)
        cap = max(64, logits.shape[1] // 16)
        codes, scale = packed["w_q8"], packed["w_q8_scale"]
        if ops.q8_argmax_fix(x, codes, scale, self.head_l1, logits, cap, counts):
            for r, c in enumerate(counts.tolist()):
                if c < 0:
                    ops.q8_gemv(x[r : r + 1], codes, scale, out=logits[r : r + 1])
        self.argmax_candidates = counts  # per row: entries recomputed exactly (tests, metrics)
        return logits

    def _block(
        self,
        x: torch.Tensor,
        i: int,
        ly: Layer,
        rope: tuple[torch.Tensor, torch.Tensor],
        batch: FlatBatch,
        cache: PagedKVCache,
        ops: object,
    ) -> torch.Tensor:
        """Decoder block i on the flat batch x [T, hidden], updated in place (its K/V written to
        the cache). Each output lands in a workspace buffer when there is one."""
        (t, hidden), hd, buf = x.shape, self.head_dim, self._buf
        h = self._norm(x, ly.attn_norm, ops, out=buf("h", t, hidden))
        q, k, v = ly.qkv(h, out=buf("qkv", t, (ly.heads + 2 * ly.kv_heads) * hd))
        q, k = q.reshape(t, ly.heads, hd), k.reshape(t, ly.kv_heads, hd)
        if ly.q_norm is not None:  # per head, in place on the native path
            q = self._norm(q, ly.q_norm, ops, out=q if ops is not None else None)
            k = self._norm(k, ly.k_norm, ops, out=k if ops is not None else None)
        cos, sin = rope
        if ops is not None:
            ops.rope_(q, k, cos, sin)
        else:
            q, k = (self._rotate(q, cos[:, None], sin[:, None]),
                    self._rotate(k, cos[:, None], sin[:, None]))  # fmt: skip
        v = v.reshape(t, ly.kv_heads, hd)
        cache.write(i, batch.slots, k, v, ops)
        attn = self._attention(q, cache, i, batch, ops, buf("attn", t, ly.heads * hd))
        out = ly.o(attn.reshape(t, ly.heads * hd), out=buf("proj", t, hidden))[0]
        if ly.post_attn_norm is not None:
            out = self._norm(out, ly.post_attn_norm, ops, out=out if ops is not None else None)
        x = x.add_(out)
        h = self._norm(x, ly.mlp_norm, ops, out=h if ops is not None else None)
        gate, up = ly.gate_up(h, out=buf("gate_up", t, 2 * ly.gate_up.sizes[0]))
        act = torch.mul(self.act(gate), up, out=buf("act", t, ly.gate_up.sizes[0]))
        out = ly.down(act, out=buf("proj", t, hidden))[0]
        if ly.post_mlp_norm is not None:
            out = self._norm(out, ly.post_mlp_norm, ops, out=out if ops is not None else None)
        return x.add_(out)

    def _attention(
        self,
        q: torch.Tensor,
        cache: PagedKVCache,
        layer: int,
        batch: FlatBatch,
        ops: object = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of q [T, heads, hd] over the cache -> [T, heads, hd] (into `out` [T,
        heads * hd] when given)."""
        d, scale = batch.decode, self.scale
        out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
        out = out.view(q.shape)
        if ops is not None and d is not None and d.all_rows:  # decode only: one fused call
            scales = (cache.k_scale[layer], cache.v_scale[layer]) if cache.k_scale else (NONE, NONE)
            kpool, vpool = cache.k[layer], cache.v[layer]
            return ops.paged_decode_attention(
                q, kpool, vpool, d.ctx, d.lengths, d.starts, scale, *scales, out=out
            )
        if d is not None:
            kv = cache.read(layer, d.ctx)
            keys, vals = (t.transpose(1, 2).to(q.dtype) for t in kv)  # [B, kv_heads, Lmax, hd]
            qd = q[d.rows].unsqueeze(2)  # [B, heads, 1, hd]
            o = F.scaled_dot_product_attention(
                qd, keys, vals, attn_mask=d.mask, enable_gqa=True, scale=scale
            )
            out[d.rows] = o.squeeze(2)
        for p in batch.prefills:
            kv = cache.read(layer, p.ctx)
            keys, vals = (t.transpose(0, 1).unsqueeze(0).to(q.dtype) for t in kv)  # [1, kvh, L, hd]
            qp = q[p.rows].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            mask = None if p.causal else p.mask  # causal: the flash kernel skips half the work
            o = F.scaled_dot_product_attention(
                qp, keys, vals, attn_mask=mask, is_causal=p.causal, enable_gqa=True, scale=scale
            )
            out[p.rows] = o.squeeze(0).transpose(0, 1)
        return out

    def visible(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """[n, k_len] bool: key j is visible to a query at position p (causal; a layer's sliding
        window is applied by the forward, `_windowed`)."""
        return torch.arange(k_len)[None, :] <= q_pos[:, None]


def _scalar(x: float) -> torch.Tensor:
    """A float32 0-dim tensor: in-place ops take it without wrapping a Python number in a new
    tensor each call (the same float32 arithmetic)."""
    return torch.tensor(float(x), dtype=torch.float32)


@functools.cache
def _window_tensor(window: int) -> torch.Tensor:
    return torch.tensor(window)


def _windowed(
    batch: FlatBatch, window: int | None, masks: bool = True, out: torch.Tensor | None = None
) -> FlatBatch:
    """The batch with each query's keys limited to its last `window` positions (sliding-window
    layers); the batch itself for full attention. Masks and starts only: the same rows and keys.
    Without `masks` only the decode group's starts change (into `out` [B, 1] when given): the
    native decode attention reads nothing else."""
    if not window:
        return batch
    d = batch.decode
    if d is not None:
        starts = torch.sub(
            d.lengths, _window_tensor(window), out=None if out is None else out[:, 0]
        )
        starts = starts.clamp_(min=0)
        mask = d.mask
        if masks:
            kpos = torch.arange(d.ctx.shape[1], device=d.ctx.device)[None, :]
            mask = d.mask & (kpos >= starts[:, None])[:, None, None, :]
        d = DecodeGroup(d.rows, d.ctx, mask, d.lengths, starts, d.all_rows)
    prefills = []
    for p in batch.prefills:
        qpos = batch.positions[p.rows]
        kpos = torch.arange(p.mask.shape[1], device=p.mask.device)[None, :]
        mask = p.mask & (kpos > qpos[:, None] - window)
        prefills.append(PrefillChunk(p.rows, p.ctx, mask))  # (no longer plain causal)
    return dataclasses.replace(batch, decode=d, prefills=prefills)
