"""Preallocated activation buffers for the lean forward (static memory).

Every activation of a step (the hidden states, the fused q/k/v and gate/up outputs, attention's
output, the RoPE tables of the step's positions, the logits) is written into a named buffer that
is allocated once and only grows: a step with more rows than any before reallocates that buffer
(to twice its rows, so growth is rare), every other step reuses it. With the native kernels'
`out=` arguments and in-place element-wise ops, a steady-state decode step allocates no tensor
memory in the forward (tests/runtime/test_static_memory.py counts it with the profiler).

A buffer is overwritten by the next forward: the logits a forward returns are the workspace's,
valid until the next call. The engine and the draft model consume them at once, so they run
with a workspace; `RuntimeLM` keeps its logits across batches, so it runs without one.
"""

from __future__ import annotations

import torch


class Workspace:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.buffers: dict[tuple, torch.Tensor] = {}  # by (name, cols, dtype)
        self.grown = 0  # how many times a buffer was (re)allocated: 0 growth in steady state

    def get(
        self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A contiguous [rows, cols] view of the buffer `name` of that width and dtype (layers of
        different widths, a pruned model's, each get their own); contents undefined."""
        key = (name, cols, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < rows:
            keep = 0 if buf is None else buf.shape[0]
            buf = torch.empty(max(rows, 2 * keep), cols, dtype=dtype, device=self.device)
            self.buffers[key] = buf
            self.grown += 1
        return buf[:rows]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def grid(
        self, name: str, rows: int, cols: int, dtype: torch.dtype = torch.long
    ) -> torch.Tensor:
        """A [rows, cols] view of a buffer that grows in both dims (by doubling): its rows are
        strided when cols is below the buffer's width (a decode group's slot table, one more
        column every step)."""
        key = (name, None, dtype)
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] < cols:
            old = (0, 0) if buf is None else buf.shape
            shape = (max(rows, 2 * old[0]), max(cols, 2 * old[1]))
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            self.buffers[key] = buf
            self.grown += 1
        return buf[:rows, :cols]
