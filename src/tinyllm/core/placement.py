"""Where decoder blocks live while a method calibrates them: in memory, or streamed from disk.

`calibrate_blocks` (and `for_each_block`) call `enter(i, block)` before a method looks at block
i and `leave(i, block)` after its outputs were computed. The default `Placement` holds the whole
model in CPU memory and computes on `device` (a block is moved there and back). `Streaming`
holds none of the blocks: `enter` reads block i from the source checkpoint (or from where an
earlier pass left it) in the compute dtype onto the device, `leave` writes it, as checkpoint
tensors (packed records, sparse masks), to a work directory and gives its memory back. Peak
memory is one block, the embeddings and the calibration activations.

    with placed(Streaming(model, LazyWeights(src), workdir)):
        run_steps(model, steps, ctx)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from tinyllm.checkpoint import checkpoint_tensors, fill_from_tensors
from tinyllm.core.resume import Journal
from tinyllm.kernels.qlinear import ActQuantLinear, QuantLinear, set_module
from tinyllm.models.anatomy import find_blocks
from tinyllm.models.lazy import LazyWeights, materialize, read_file, release
from tinyllm.util.memory import trim_heap

# offload="auto": calibration activations stay in CPU memory when the copies a pass holds
# (inputs, outputs, a reference stream) would take more than this share of the device's free memory
OFFLOAD_SHARE = 0.25
OFFLOAD_MODES = ("auto", "on", "off")


class HostActivations(list):
    """Calibration activations held in CPU memory while blocks compute on a GPU (activation
    offload): an item is copied to `device` when read and back to the host when written, so the
    device holds the batch being computed, not the whole calibration set. Reads are always
    copies (on the CPU too), so a method that changed a read item in place would be wrong on
    every device, not only on a GPU: the CPU tests see what a GPU run would."""

    def __init__(self, items: list[torch.Tensor], device: torch.device) -> None:
        super().__init__(x.to("cpu") for x in items)
        self.device = device

    def __getitem__(self, i):  # type: ignore[override]
        got = super().__getitem__(i)
        if isinstance(i, slice):
            return [x.to(self.device, copy=True) for x in got]
        return got.to(self.device, copy=True)

    def __setitem__(self, i, value) -> None:  # type: ignore[override]
        if isinstance(i, slice):
            super().__setitem__(i, [v.to("cpu") for v in value])
        else:
            super().__setitem__(i, value.to("cpu"))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Placement:
    """The whole model in CPU memory; blocks computed on `device` (moved there and back).
    `offload` ("auto", "on", "off"): keep the calibration activations in CPU memory
    (HostActivations); auto does when a GPU's free memory is short for them."""

    streaming = False

    def __init__(self, device: torch.device | str = "cpu", offload: str = "auto") -> None:
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload must be one of {OFFLOAD_MODES}, not {offload!r}")
        self.device, self.offload = torch.device(device), offload

    def activations(self, items: list[torch.Tensor], copies: int = 2) -> list[torch.Tensor]:
        """A pass's calibration activations where they are kept: on the compute device, or in
        CPU memory (`offload`). `copies`: how many such sets the pass holds at once."""
        if self.offloads(sum(x.numel() * x.element_size() for x in items) * copies):
            return HostActivations(items, self.device)
        return [x.to(self.device) for x in items]

    def offloads(self, nbytes: int) -> bool:
        if self.offload != "auto":
            return self.offload == "on"
        if self.device.type != "cuda":
            return False  # the CPU is the host: nothing to offload to
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes > OFFLOAD_SHARE * free

    def enter(self, i: int, block: nn.Module) -> None:
        if self.device.type != "cpu":
            block.to(self.device)

    def leave(self, i: int, block: nn.Module) -> None:
        if self.device.type != "cpu":
            block.to("cpu")

    def embeddings_needed(self, model: nn.Module) -> None:
        """Before a pass computes the blocks' first inputs (held in memory: nothing to do)."""

    def embeddings_done(self, model: nn.Module) -> None:
        """After the first inputs of a pass are computed."""

    def begin_pass(self, xs: list | None = None, ref: list | None = None) -> int:
        """A pass over the blocks starts, its first inputs in `xs` (and `ref`): -> the first
        block it must compute (a resumed streamed run replaces the inputs by the recorded ones
        and skips the blocks it finished)."""
        return 0

    def block_done(self, i: int, xs: list | None = None, ref: list | None = None) -> None:
        """Block i is compressed and left; xs (and ref) hold its outputs."""

    def blocks_kept(self, keep: list[int]) -> None:
        """Only the blocks at `keep` (ascending) remain, renumbered 0.. (layer dropping; the
        model's module list is rewritten by the caller)."""


class Streaming(Placement):
    """Blocks read from `weights` when first entered, written to `workdir` when left, and read
    back from there when entered again (a second pass, a second step)."""

    streaming = True

    def __init__(
        self,
        model: nn.Module,
        weights: LazyWeights,
        workdir: Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        tied: bool = False,
        journal: Journal | None = None,
        offload: str = "auto",
    ) -> None:
        super().__init__(device, offload)
        self.model, self.weights, self.dtype, self.tied = model, weights, dtype, tied
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix, _ = find_blocks(model)
        self.stored: dict[int, tuple[Path, dict, dict]] = {}  # block -> file, quantized, sparse
        self.source_index: list[int] | None = None  # block -> its index in the source (dropping)
        # core/resume.py: progress recorded after each block; `report` is the running step's
        self.journal, self.report, self.passes = journal, {}, 0

    def begin_pass(self, xs: list | None = None, ref: list | None = None) -> int:
        self.passes += 1
        state = self.journal.state if self.journal is not None else None
        if state is None or state["pass"] != self.passes - 1:
            return 0
        self.stored.update(self.journal.stored())
        saved_xs, saved_ref = self.journal.activations(self.device)
        for live, saved in ((xs, saved_xs), (ref, saved_ref)):
            if live is not None:
                live[:] = saved
        for key, value in state["report"].items():  # in place: a method holds its dicts
            held = self.report.get(key)
            if isinstance(held, dict) and isinstance(value, dict):
                held.update(value)
            else:
                self.report[key] = value
        self.journal.state = None  # used
        return int(state["done"])

    def block_done(self, i: int, xs: list | None = None, ref: list | None = None) -> None:
        if self.journal is not None:
            self.journal.save(self.passes - 1, i + 1, self.stored, self.report, xs, ref)

    def blocks_kept(self, keep: list[int]) -> None:
        """Renumber the stored blocks: each kept one rewritten under its new index (in
        ascending order, so block j's new file is never one a later kept block still needs),
        and remember where an unstored one is read from in the source."""
        stored, self.stored = self.stored, {}
        for j, old in enumerate(keep):
            if old not in stored:
                continue
            if old == j:
                self.stored[j] = stored[old]
                continue
            file, quantized, sparse = stored[old]
            rename = _renumber(f"{self.prefix}.{old}.", f"{self.prefix}.{j}.")
            moved = self.workdir / f"block{j:05d}.safetensors"
            partial = moved.with_suffix(".partial")
            save_file(rename(read_file(file)), str(partial))
            partial.replace(moved)
            file.unlink()
            self.stored[j] = (moved, rename(quantized), rename(sparse))
        source = self.source_index or list(range(max(keep) + 1))
        self.source_index = [source[old] for old in keep]

    def enter(self, i: int, block: nn.Module) -> None:
        if i not in self.stored:
            source = self.source_index[i] if self.source_index is not None else i
            materialize(block, f"{self.prefix}.{source}", self.weights, self.dtype, self.device)
            return
        file, quantized, sparse = self.stored[i]
        info = {"quantized": quantized, "sparse": sparse}
        tensors = {k: v.to(self.device) for k, v in read_file(file).items()}
        fill_from_tensors(self.model, tensors, info, {}, self.dtype)

    def embeddings_needed(self, model: nn.Module) -> None:
        emb = model.get_input_embeddings()
        if emb.weight.device.type == "meta":
            name = next(n for n, m in model.named_modules() if m is emb)
            materialize(emb, name, self.weights, None)
            self._retie(model)

    def embeddings_done(self, model: nn.Module) -> None:
        """The embedding table is not needed until the next pass: give its memory back (1 GB
        on a 128k-vocabulary 4096-wide model), read it again when a pass needs it."""
        release(model.get_input_embeddings())
        self._retie(model)

    def _retie(self, model: nn.Module) -> None:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if self.tied and head is not None:
            head.weight = emb.weight

    def leave(self, i: int, block: nn.Module) -> None:
        tensors, quantized, sparse = checkpoint_tensors(self.model, f"{self.prefix}.{i}")
        file = self.workdir / f"block{i:05d}.safetensors"
        partial = file.with_suffix(".partial")
        save_file({k: v.cpu() for k, v in tensors.items()}, str(partial))
        partial.replace(file)
        self.stored[i] = (file, quantized, sparse)
        unpack_block(block)
        release(block)
        trim_heap()


def _renumber(old: str, new: str):
    """A function that renames the keys of a dict that start with `old` to start with `new`
    (the tensors, quantized records and sparse layers of a renumbered block)."""

    def rename(d: dict) -> dict:
        return {new + k[len(old) :] if k.startswith(old) else k: v for k, v in d.items()}

    return rename


def unpack_block(block: nn.Module) -> None:
    """Put plain linears (meta) where packed ones are, so the released block has the float
    structure `enter` expects (a stored block's records are swapped in again when it is read)."""
    for name, mod in list(block.named_modules()):
        if isinstance(mod, QuantLinear | ActQuantLinear):
            bias = getattr(mod, "bias", None) is not None
            with torch.device("meta"):
                plain = nn.Linear(mod.in_features, mod.out_features, bias=bias)
            set_module(block, name, plain)


_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
    "placement", default=None
)
_IN_MEMORY = Placement()


def placement() -> Placement:
    """Where blocks live right now (the whole model in CPU memory unless `placed` says else)."""
    return _PLACEMENT.get() or _IN_MEMORY


@contextlib.contextmanager
def placed(where: Placement) -> Iterator[Placement]:
    token = _PLACEMENT.set(where)
    try:
        yield where
    finally:
        _PLACEMENT.reset(token)
