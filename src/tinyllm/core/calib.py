"""Block-by-block calibration: capture one block's inputs, let a method look and act, move on.

Memory stays bounded by one block's activations for the calibration set. Each block's inputs are
the outputs of the previous block *after* it was compressed, so errors are corrected downstream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

from tinyllm.core.kernels import block_compute
from tinyllm.core.placement import placement
from tinyllm.models.anatomy import analyze
from tinyllm.util.memory import trim_heap
from tinyllm.util.progress import make_progress


class _Stop(Exception):
    pass


def _capture_kwargs(model: nn.Module, blocks: list[nn.Module], batch: torch.Tensor) -> list[dict]:
    """Keyword arguments each block receives for this batch. The model runs with every block
    stood in for by a pass-through that records its arguments (no block computes, so a model
    whose blocks are not in memory, see core/placement.py, works too); it stops at the last."""
    captured: list[dict] = [{} for _ in blocks]
    container = _container(model, blocks)
    stand_ins = [_PassThrough(b, captured, i, i == len(blocks) - 1) for i, b in enumerate(blocks)]
    try:
        for i, stand_in in enumerate(stand_ins):
            container[i] = stand_in
        model(input_ids=batch, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, block in enumerate(blocks):
            container[i] = block
    return captured


def _container(model: nn.Module, blocks: list[nn.Module]) -> nn.ModuleList:
    """The ModuleList holding the blocks."""
    from tinyllm.models.anatomy import find_blocks

    _, container = find_blocks(model)
    if list(container)[: len(blocks)] != blocks:
        raise RuntimeError("the blocks are not the model's block list")
    return container


class _PassThrough(nn.Module):
    """Stands in for block i while its keyword arguments are recorded: returns its input
    unchanged (raises _Stop when it is the last); other attributes are the block's (the model's
    forward may read one, such as Gemma's attention_type)."""

    def __init__(self, block: nn.Module, sink: list[dict], i: int, last: bool) -> None:
        super().__init__()
        self.__dict__.update(_block=block, _sink=sink, _i=i, _last=last)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._sink[self._i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if self._last:
            raise _Stop
        return hidden_states


def _broadcasts_to(one: Any, full: Any) -> bool:
    """Whether a keyword argument captured for one sequence equals the whole batch's, up to
    broadcasting over the batch (tensors, nested tuples/lists, plain values)."""
    if isinstance(full, torch.Tensor):
        if not isinstance(one, torch.Tensor) or one.dtype != full.dtype or one.dim() != full.dim():
            return False
        try:
            return torch.equal(one.expand_as(full), full)
        except RuntimeError:  # not broadcastable
            return False
    if isinstance(full, (tuple, list)):
        return (
            isinstance(one, (tuple, list))
            and len(one) == len(full)
            and all(_broadcasts_to(a, b) for a, b in zip(one, full, strict=True))
        )
    return type(one) is type(full) and (one is full or one == full)


def _block_kwargs(model: nn.Module, blocks: list[nn.Module], batch: torch.Tensor) -> list[dict]:
    """Keyword arguments each block receives (masks and rotary tables differ per layer type).
    They are captured on the batch's first sequence and used for whole batches by broadcasting
    (one-sequence masks and tables, as calibration always used). That holds when they do not
    depend on the sequence (full windows: no padding masks); block 0's, captured for the whole
    batch as well, must agree, else every block's is captured on the whole batch."""
    if len(batch) == 1:
        return _capture_kwargs(model, blocks, batch)
    whole_first = _capture_kwargs(model, blocks[:1], batch)[0]
    one = _capture_kwargs(model, blocks, batch[:1])
    if whole_first.keys() == one[0].keys() and all(
        _broadcasts_to(one[0][k], v) for k, v in whole_first.items()
    ):
        return one
    return _capture_kwargs(model, blocks, batch)


def _first_inputs(model: nn.Module, blocks: list[nn.Module], batches: list[torch.Tensor]) -> list:
    """Hidden states entering block 0, for every batch (only embeddings run)."""
    inputs = []

    def hook(_mod, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with suppress(_Stop):
                model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def input_hooks(
    block: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor], None]
) -> Iterator:
    """Call fn(name, input [tokens, in_features]) on every forward of the named submodules."""

    def make(name: str):
        def hook(_mod, args):
            fn(name, args[0].reshape(-1, args[0].shape[-1]))

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make(n)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def observe_block(
    block: nn.Module,
    xs: list[torch.Tensor],
    kwargs: dict,
    names: list[str],
    fn: Callable[[str, torch.Tensor], None],
) -> None:
    """Forward each batch through the block (fast kernels), showing fn the named linears inputs.
    Nothing after the last named input is needed: from the second batch on, each forward stops
    there (saving, say, the down projection when every linear is observed)."""
    look = _StopAfterLast(fn)
    with block_compute(block, xs[0].shape[0] * xs[0].shape[1]), input_hooks(block, names, look):
        for x in xs:
            with suppress(_Stop):
                run_block(block, x, kwargs)
            look.learned()


class _StopAfterLast:
    """Hook wrapper: records the order of the observed inputs on the first forward, then stops
    later forwards (raising _Stop) once the last of them was seen, if it is seen only once."""

    def __init__(self, fn: Callable[[str, torch.Tensor], None]) -> None:
        self.fn, self.order, self.last = fn, [], None

    def __call__(self, name: str, x: torch.Tensor) -> None:
        self.fn(name, x)
        if self.last is None:
            self.order.append(name)
        elif name == self.last:
            raise _Stop

    def learned(self) -> None:
        if self.last is None and self.order and self.order.count(self.order[-1]) == 1:
            self.last = self.order[-1]


def observe_pair(
    block: nn.Module,
    xs: list[torch.Tensor],
    ref: list[torch.Tensor],
    kwargs: dict,
    names: list[str],
    fn: Callable[[str, torch.Tensor, torch.Tensor], None],
    float_block: nn.Module | None = None,
    advance: bool = True,
) -> None:
    """observe_block for two streams: batch by batch, the float model's hidden states `ref` run
    through the float block first, then the compressed model's `xs`; fn(name, x, x_ref) sees
    each named linear's input from both. The float block is `block` itself unless
    `float_block` (a float copy, for a block already partly compressed) is given. With advance,
    `ref` is replaced in place by the float block's outputs, so it enters the next block as the
    float model's hidden states; without, both forwards stop after the last named input."""
    float_block = block if float_block is None else float_block
    seen: dict[str, torch.Tensor] = {}
    look = _StopAfterLast(lambda n, t: fn(n, t, seen[n]))
    look_ref = seen.__setitem__ if advance else _StopAfterLast(seen.__setitem__)
    tokens = xs[0].shape[0] * xs[0].shape[1]
    with block_compute(block, tokens), _maybe_compute(float_block, block, tokens):
        for b, (x, r) in enumerate(zip(xs, ref, strict=True)):
            with input_hooks(float_block, names, look_ref), suppress(_Stop):
                out = run_block(float_block, r, kwargs)
                if advance:
                    ref[b] = out
            with input_hooks(block, names, look), suppress(_Stop):
                run_block(block, x, kwargs)
            look.learned()
            if not advance:
                look_ref.learned()
            seen.clear()


@contextmanager
def _maybe_compute(other: nn.Module, block: nn.Module, tokens: int) -> Iterator:
    """block_compute for a second block, unless it is the block already set up."""
    if other is block:
        yield
    else:
        with block_compute(other, tokens):
            yield


@dataclass
class Probe:
    """What one trial forward of a block shows (see probe_block)."""

    stages: list[list[str]]  # input_stages
    plans: dict[str, tuple[str, int | None, int]]  # replay_plans
    # a child module of the block -> the one other child that alone reads its output (the input
    # norm -> attention): once that reader is replayed, the child's work is thrown away
    feeds: dict[str, str] = field(default_factory=dict)


class _Reads(TorchFunctionMode):
    """Records which of the block's children (None: the block's own code) each watched tensor
    is read by, through any torch function or tensor method."""

    def __init__(self, watched: dict[int, str], running: list[str], reads: dict) -> None:
        super().__init__()
        self.watched, self.running, self.reads = watched, running, reads

    def note(self, values: Any, reader: str | None) -> None:
        for leaf in tree_leaves(values):
            owner = self.watched.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
            if owner is not None:
                self.reads[owner].add(reader)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.note((args, kwargs), self.running[0] if self.running else None)
        return func(*args, **kwargs)


def probe_input(x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What a block's trial forward (probe_block) runs on: x's first sample, or the whole batch
    x where a keyword argument was captured for the whole batch (one whose first dimension is
    x's batch size: _block_kwargs falls back to whole-batch capture when the arguments differ
    between sequences, and a one-sample forward could not take a padding mask made for 8)."""

    def per_batch(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return v.dim() > 0 and v.shape[0] == x.shape[0]
        if isinstance(v, (tuple, list)):
            return any(per_batch(a) for a in v)
        return False

    whole = x.shape[0] > 1 and any(per_batch(v) for v in kwargs.values())
    return x if whole else x[:1]


def probe_block(block: nn.Module, x: torch.Tensor, kwargs: dict, names: list[str]) -> Probe:
    """One trial forward of the block on a batch x (on its first sample where the kwargs allow,
    see probe_input) with the named linears: their stages (input_stages), the modules their
    outputs stand for (replay_plans) and which children only feed another child (Probe.feeds;
    only children whose output is a plain tensor, traced through every torch call, so a tensor
    the block's own code reads is never counted as fed)."""
    x = probe_input(x, kwargs)
    order = _StageOrder()
    outs: dict[str, Any] = {}
    tracer = _ChildReads(block)
    parents = {n.rsplit(".", 1)[0] for n in names if "." in n}
    handles = [
        block.get_submodule(k).register_forward_hook(_keep_output(outs, k))
        for k in [*parents, *names]
    ]
    handles += tracer.register()
    try:
        with input_hooks(block, names, order.see), tracer.mode:
            out = run_block(block, x, kwargs)
        tracer.mode.note(out, None)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if not any(n in s for s in order.stages)]
    return Probe(order.stages + [[n] for n in missing], _plans(names, outs), tracer.feeds())


class _StageOrder:
    """input_hooks callback: groups the names by the tensor they read (its storage and shape), in
    the order the forward reaches them. The tensors are kept alive, so no storage is reused."""

    def __init__(self) -> None:
        self.stages: list[list[str]] = []
        self.owners: dict[tuple, int] = {}
        self.alive: list[torch.Tensor] = []

    def see(self, name: str, t: torch.Tensor) -> None:
        key = (t.data_ptr(), tuple(t.shape))
        if key not in self.owners:
            self.owners[key] = len(self.stages)
            self.stages.append([])
            self.alive.append(t)
        if name not in self.stages[self.owners[key]]:
            self.stages[self.owners[key]].append(name)


def _keep_output(outs: dict[str, Any], key: str) -> Callable:
    """Forward hook storing the module's output in outs[key]."""

    def hook(_mod, _args, out):
        outs[key] = out

    return hook


class _ChildReads:
    """Hooks and a torch function mode that record, for each child of the block whose output is
    a plain tensor, which children (None: the block's own code) read that output."""

    def __init__(self, block: nn.Module) -> None:
        self.children = dict(block.named_children())
        self.watched: dict[int, str] = {}
        self.reads: dict[str, set] = {name: set() for name in self.children}
        self.running: list[str] = []
        self.alive: list[torch.Tensor] = []  # watched outputs stay alive: their ids stay unique
        self.mode = _Reads(self.watched, self.running, self.reads)

    def register(self) -> list:
        """Register the hooks on every child; -> their handles."""
        handles = []
        for child, module in self.children.items():
            handles.append(module.register_forward_pre_hook(self._enter(child), with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave(child), with_kwargs=True))
        return handles

    def _enter(self, child: str) -> Callable:
        def hook(_mod, args, kw):
            self.mode.note((args, kw), child)
            self.running.append(child)

        return hook

    def _leave(self, child: str) -> Callable:
        def hook(_mod, _args, _kw, out):
            self.running.pop()
            if isinstance(out, torch.Tensor) and id(out) not in self.watched:
                self.watched[id(out)] = child
                self.alive.append(out)

        return hook

    def feeds(self) -> dict[str, str]:
        """child -> the one other child that alone reads its output."""
        return {
            child: next(iter(by))
            for child, by in self.reads.items()
            if len(by) == 1 and None not in by and child not in by
        }


def _plans(names: list[str], outs: dict[str, Any]) -> dict[str, tuple[str, int | None, int]]:
    """The replay plans (see replay_plans) read off the recorded module outputs."""
    plans: dict[str, tuple[str, int | None, int]] = {}
    for name in names:
        parent = name.rsplit(".", 1)[0] if "." in name else None
        if parent is None or name not in outs or parent not in outs:
            continue
        out, mine = outs[parent], outs[name]
        if out is mine:
            plans[name] = (parent, None, 1)
        elif isinstance(out, tuple) and all(o is mine or o is None for o in out):
            at = [i for i, o in enumerate(out) if o is mine]
            if len(at) == 1:
                plans[name] = (parent, at[0], len(out))
    return plans


def input_stages(
    block: nn.Module, x: torch.Tensor, kwargs: dict, names: list[str]
) -> list[list[str]]:
    """The named linears grouped by the tensor they read (q/k/v share one, gate/up another), in
    the order one forward reaches them: the order in which true-sequential calibration
    compresses them, so each stage is observed with every earlier stage already compressed."""
    return probe_block(block, x, kwargs, names).stages


def replay_plans(
    block: nn.Module, x: torch.Tensor, kwargs: dict, names: list[str]
) -> dict[str, tuple[str, int | None, int]]:
    """Named linears whose output is, as is, the whole output of their parent module (o_proj's
    is the attention module's, down_proj's the MLP's), found by one forward:
    {linear: (parent, position in the parent's output tuple or None, tuple length)}. A tuple
    qualifies when every other element is None (no attention weights returned)."""
    return probe_block(block, x, kwargs, names).plans


class _Replayed(nn.Module):
    """Stands in for a module whose output is one of its linears' outputs: that linear applied
    to the input it was seen with (kept per batch as (tensor, the dtype it was seen in)),
    computed once and then returned again. `batch` says which batch the running forward is."""

    def __init__(self, leaf: str, index: int | None, arity: int, kept: list) -> None:
        super().__init__()
        self.leaf, self.index, self.arity, self.values = leaf, index, arity, kept
        self.done = [False] * len(kept)
        self.batch = 0

    def bind(self, original: nn.Module) -> None:
        self.__dict__["linear"] = original.get_submodule(self.leaf)  # not a submodule

    def forward(self, *_args, **_kwargs):
        b = self.batch
        if not self.done[b]:
            x, dtype = self.values[b]
            self.values[b], self.done[b] = self.__dict__["linear"](x.to(dtype)), True
        out = self.values[b]
        return (
            out
            if self.index is None
            else tuple(out if i == self.index else None for i in range(self.arity))
        )


class _Skipped(nn.Module):
    """Stands in for a child of the block whose output only a replayed module reads (and that
    ignores its inputs): hands its first input on instead of computing (the input norm once
    attention is replayed: its output would be thrown away)."""

    def forward(self, *args, **kwargs):
        return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def _replacing(block: nn.Module, replays: dict[str, nn.Module]) -> Iterator:
    """Put each replay (or stand-in) in its module's place inside the block (restored after)."""
    swapped = []
    try:
        for path, replay in replays.items():
            parent_path, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_path) if parent_path else block
            original = getattr(parent, attr)
            if isinstance(replay, _Replayed):
                replay.bind(original)
            setattr(parent, attr, replay)
            swapped.append((parent, attr, original))
        yield
    finally:
        for parent, attr, original in reversed(swapped):
            setattr(parent, attr, original)


class _Kept:
    """One stage's kept inputs, batch by batch, as (tensor, the dtype it was seen in), in one
    buffer for all batches: a single large allocation, given back to the system when freed,
    where many batch-sized ones would leave the heap fragmented and the process larger. Stored
    in `dtype` (when narrower) for each batch whose values all fit it, else as they were."""

    def __init__(self, batches: int, dtype: torch.dtype | None) -> None:
        self.batches, self.dtype = batches, dtype
        self.buffer: torch.Tensor | None = None
        self.items: list = []

    def add(self, x: torch.Tensor) -> None:
        narrower = self.dtype is not None and self.dtype.itemsize < x.dtype.itemsize
        want = self.dtype if narrower else x.dtype
        if self.buffer is None:
            self.buffer = torch.empty((self.batches, *x.shape), dtype=want)
        b = len(self.items)
        fits = self.buffer.shape[1:] == x.shape and self.buffer.dtype == want
        slot = self.buffer[b].copy_(x) if fits else x.to(want, copy=True)
        if narrower and not torch.isfinite(slot).all():
            slot = x
        self.items.append((slot, x.dtype))


def staged_pass(
    block: nn.Module,
    xs: list[torch.Tensor],
    kwargs: dict,
    stages: list[list[str]],
    observe: Callable[[str, torch.Tensor], None],
    compress: Callable[[list[str]], None],
    wide: torch.dtype | None = torch.float16,
    probe: Probe | None = None,
    skip: bool = True,
) -> None:
    """True-sequential calibration of one block in about one forward's work; `xs` is replaced
    in place by the block's outputs under the compressed weights.

    For each stage (linears reading one tensor, in forward order; see input_stages) every
    batch's forward runs up to the stage's input, which observe(name, x) sees for each member,
    and stops there; then compress(stage) changes the stage's weights. A final forward of each
    batch gives the block's outputs. What is computed once is not computed again: a stage that
    completes a module whose output is its linear's output (o_proj -> attention, down_proj ->
    MLP) keeps its inputs, and later forwards replace that module by the compressed linear
    applied to the kept input: attention runs once, and the final forward does not recompute
    gate/up (`wide`, the dtype the wider inputs are kept in: see _kept_stages). With `skip`, a
    child whose output only a replayed module reads is not run either (_skipped_children).
    `probe`: the block's probe_block on these names, if the caller has it (else taken here)."""
    names = [n for stage in stages for n in stage]
    if probe is None:
        probe = probe_block(block, xs[0], kwargs, names) if names else Probe([], {})
    keep = _kept_stages(block, names, stages, probe.plans, xs, wide)
    replays: dict[str, _Replayed] = {}
    tokens = xs[0].shape[0] * xs[0].shape[1]
    for k, stage in enumerate([*stages, None]):
        kept = _Kept(len(xs), wide if keep[k][4] else None) if k in keep else None
        dead = _skipped_children(block, names, probe.feeds, replays) if skip else {}
        with block_compute(block, tokens), _replacing(block, {**replays, **dead}):
            _forward_batches(block, xs, kwargs, stage, replays, _stage_hook(stage, observe, kept))
        if stage is not None:
            compress(stage)
            trim_heap()  # the stage's Hessians and solve buffers, freed: give them back
            if kept is not None:
                name, parent, index, arity, _ = keep[k]
                replays[parent] = _Replayed(name[len(parent) + 1 :], index, arity, kept.items)


# A stage's inputs are kept for replay only up to this size (all batches): above it the final
# forward recomputes the module instead (one more forward of it per block, for the memory of
# up to two more copies of the calibration activations: 1.5 GiB on a Llama-3.2-1B block at
# 128 x 512). SmolLM2-135M and Gemma-3-270M at 128 x 512 keep both of theirs (<= 256 MiB each).
KEEP_STAGE_BYTES = 256 * 2**20


def _kept_stages(
    block: nn.Module,
    names: list[str],
    stages: list[list[str]],
    plans: dict[str, tuple[str, int | None, int]],
    xs: list[torch.Tensor],
    wide: torch.dtype | None,
) -> dict[int, tuple[str, str, int | None, int, bool]]:
    """Stages whose inputs staged_pass keeps, to replay a module by its compressed linear:
    {stage: (linear, parent, index, arity, wide)} for each plan (replay_plans) whose parent holds
    no linear of a later stage and whose kept inputs take at most KEEP_STAGE_BYTES. Inputs no
    wider than the block's hidden size (o_proj's) are kept as they are (one more copy of the
    calibration activations); wider ones (down_proj's, 2.7x on SmolLM2) are kept in `wide`
    (float16: half the memory; each batch whose values float16 cannot hold stays in its own
    dtype), so the final forward sees them rounded to 11 significant bits, while the stage's own
    observation saw them exact. With 16-bit calibration forwards they are kept as they are;
    wide=None does not keep them (the final forward recomputes the MLP up to them)."""
    hidden, rows = xs[0].shape[-1], sum(x.numel() // x.shape[-1] for x in xs)
    stage_of = {n: k for k, stage in enumerate(stages) for n in stage}
    keep: dict[int, tuple[str, str, int | None, int, bool]] = {}
    for name, (parent, index, arity) in plans.items():
        inside = [n for n in names if n.startswith(parent + ".")]
        width = block.get_submodule(name).in_features
        narrow = width <= hidden
        held = (
            xs[0].dtype
            if narrow or wide is None
            else min(wide, xs[0].dtype, key=lambda d: d.itemsize)
        )
        fits = rows * width * held.itemsize <= KEEP_STAGE_BYTES
        later = any(stage_of[n] > stage_of[name] for n in inside)
        if fits and (narrow or wide is not None) and not later:
            keep.setdefault(stage_of[name], (name, parent, index, arity, not narrow))
    return keep


def _skipped_children(
    block: nn.Module, names: list[str], feeds: dict[str, str], replays: dict[str, _Replayed]
) -> dict[str, nn.Module]:
    """Stand-ins for the children of the block whose output only a replayed module reads
    (Probe.feeds: the input norm once attention is replayed, the MLP's norm in the final
    forward), unless they are replayed themselves or hold a named linear."""
    children = [c for c, _ in block.named_children()]
    with_linears = {c for c in children if any(n == c or n.startswith(c + ".") for n in names)}
    return {
        child: _Skipped()
        for child, reader in feeds.items()
        if reader in replays and child not in replays and child not in with_linears
    }


def _stage_hook(
    stage: list[str] | None, observe: Callable[[str, torch.Tensor], None], kept: _Kept | None
) -> Callable:
    """Forward pre-hook on a stage's linears: observe the input for every member, keep it if
    asked, and stop the forward."""

    def seen(_mod, args):
        flat = args[0].reshape(-1, args[0].shape[-1])
        for n in stage:
            observe(n, flat)
        if kept is not None:
            kept.add(args[0])
        raise _Stop

    return seen


def _forward_batches(
    block: nn.Module,
    xs: list[torch.Tensor],
    kwargs: dict,
    stage: list[str] | None,
    replays: dict[str, _Replayed],
    hook: Callable,
) -> None:
    """Each batch's forward up to the stage's input (where `hook` stops it); for the final
    forward (stage None) the whole block, whose output replaces the batch's input in xs."""
    handles = [block.get_submodule(n).register_forward_pre_hook(hook) for n in stage or []]
    try:
        for b, x in enumerate(xs):
            for replay in replays.values():
                replay.batch = b
            try:
                out = run_block(block, x, kwargs)
            except _Stop:
                continue
            if stage is not None:
                raise RuntimeError(f"the forward never reached {stage[0]}")
            xs[b] = out
            for replay in replays.values():  # the final forward was its last use
                replay.values[b] = None
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def block_inputs(
    model: nn.Module, batches: list[torch.Tensor]
) -> tuple[list[list[torch.Tensor]], list[dict[str, Any]]]:
    """What every block receives under the current weights, for every batch (of one shape), and
    each block's keyword arguments. -> (inputs[block][batch] plus the last block's outputs as a
    final entry, kwargs[block])"""
    blocks = analyze(model).blocks
    kwargs = _block_kwargs(model, blocks, batches[0])
    xs = _first_inputs(model, blocks, batches)
    inputs = [xs]
    for i, block in enumerate(blocks):
        with block_compute(block, xs[0].shape[0] * xs[0].shape[1]):
            xs = [run_block(block, x, kwargs[i]) for x in xs]
        inputs.append(xs)
    return inputs, kwargs


class Advanced:
    """Returned by a BlockFn that already replaced the block's inputs by its outputs (as
    staged_pass does), so calibrate_blocks does not run the block again; `finish` as below."""

    def __init__(self, finish: Callable[[], None] | None = None) -> None:
        self.finish = finish


# fn(index, block, inputs, kwargs) compresses the block; it may return a callable that runs
# after the block's outputs were computed (to swap fake-quantized weights for packed modules),
# or Advanced(that callable) when it computed those outputs itself.
# With reference=True it is called as fn(index, block, inputs, kwargs, ref) and must advance
# `ref`, the float model's hidden states, through the float block (observe_pair does).
BlockFn = Callable[..., Callable[[], None] | None]


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int,
    fn: BlockFn,
    description: str = "calibrating",
    status: Callable[[int], str] | None = None,
    reference: bool = False,
) -> None:
    """For each block: fn(index, block, inputs, kwargs) compresses it in place; its outputs with
    the compressed weights become the next block's inputs. reference=True also carries the float
    model's hidden states (for methods that match the float model's outputs, not the float
    weights' outputs on compressed inputs); that costs one more block pass and one more copy
    of the calibration activations."""
    # Only the blocks: holding the anatomy's linear sites would keep every linear a method
    # swaps out (its float weight) alive until the end of the run.
    blocks = analyze(model).blocks
    batches = list(windows.split(batch_size))
    was_training = model.training
    model.eval()
    where = placement()
    where.embeddings_needed(model)
    kwargs = _block_kwargs(model, blocks, batches[0])
    first = _first_inputs(model, blocks, batches)
    xs = where.activations(first, copies=3 if reference else 2)  # + the outputs being made
    del first  # (each input is freed as the pass replaces it)
    where.embeddings_done(model)
    ref = where.activations([x.clone() for x in xs]) if reference else None
    start = where.begin_pass(xs, ref)  # > 0: a resumed streamed run (core/resume.py)
    with make_progress() as bar:
        task = bar.add_task(description, total=len(blocks), completed=start, info="")
        for i, block in enumerate(blocks):
            if i < start:
                continue
            where.enter(i, block)
            kw = tree_map(lambda v: v.to(where.device) if torch.is_tensor(v) else v, kwargs[i])
            finish = _call(fn, i, block, xs, kw, ref, description)
            finish = _advance(block, xs, kw, finish)
            if finish is not None:
                finish()
            where.leave(i, block)
            where.block_done(i, xs, ref)
            info = status(i) if status else ""
            bar.update(task, advance=1, info=f"block {i + 1}/{len(blocks)} {info}")
    model.train(was_training)


def for_each_block(model: nn.Module, fn: Callable[[int, nn.Module], None]) -> None:
    """fn(index, block) on every block where it lives (core/placement.py: streamed blocks are
    read before and written after), for methods that need no calibration data."""
    where = placement()
    start = where.begin_pass()
    for i, block in enumerate(analyze(model).blocks):
        if i < start:
            continue
        where.enter(i, block)
        fn(i, block)
        where.leave(i, block)
        where.block_done(i)


def _call(
    fn: BlockFn,
    i: int,
    block: nn.Module,
    xs: list[torch.Tensor],
    kwargs: dict,
    ref: list[torch.Tensor] | None,
    description: str,
) -> Any:
    """fn on block i (with the reference stream, if any, which it must advance)."""
    if ref is None:
        return fn(i, block, xs, kwargs)
    before = ref[0]
    finish = fn(i, block, xs, kwargs, ref)
    if ref[0] is before:
        raise RuntimeError(f"{description}: block {i} did not advance the reference")
    return finish


def _advance(
    block: nn.Module, xs: list[torch.Tensor], kwargs: dict, finish: Any
) -> Callable[[], None] | None:
    """Replace the block's inputs xs by its outputs, unless fn did (Advanced); -> what runs next."""
    if isinstance(finish, Advanced):
        return finish.finish
    with block_compute(block, xs[0].shape[0] * xs[0].shape[1]):
        for b, x in enumerate(xs):  # in place: each input is freed as it is replaced
            xs[b] = run_block(block, x, kwargs)
    return finish
