"""Packed layers follow `.to(device)`: the record moves with its buffers (in place, so a tied
embedding and head keep one record), and a layout that cannot run on the new device gives way to
one that can (tinyllm's C++ and PyTorch's packed kernels are CPU-only; elsewhere dequantize).

Without a GPU the move is exercised on the meta device (shapes only), which no CPU kernel takes
either; tests/test_gpu.py (marked `gpu`) runs the same layers on CUDA against the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tinyllm.kernels.actquant import static_spec
from tinyllm.kernels.layouts import int_mm
from tinyllm.kernels.primitives import pack_bits, unpack_bits
from tinyllm.kernels.qlinear import ActQuantLinear, QuantEmbedding, QuantLinear
from tinyllm.kernels.qweight import QuantizedWeight
from tinyllm.quant.int8 import int8_weight
from tinyllm.quant.nf4 import NF4, nf4_quantize
from tinyllm.quant.rtn import RTN, rtn_quantize

# (record, the layouts it may take on the CPU): C++ kernels when they build, PyTorch's otherwise
RECORDS = {
    "q4-g32": (lambda w: rtn_quantize(w, RTN(bits=4, group_size=32, sym=True)), {"q4", "int4"}),
    "q8-row": (lambda w: rtn_quantize(w, RTN(bits=8, group_size=-1, sym=True)), {"q8", "int8"}),
    "3bit": (lambda w: rtn_quantize(w, RTN(bits=3, group_size=32)), {"dequant"}),
    "nf4": (lambda w: nf4_quantize(w, NF4(block_size=64)), {"dequant"}),
}


def _layer(name: str, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    make, _ = RECORDS[name]
    return QuantLinear(make(torch.randn(96, 256)), torch.randn(96))


def _buffers(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_buffers()}


def _record_buffers(qw: QuantizedWeight) -> set[str]:
    return {name.replace(".", "_") for name in qw.tensors("record")}


@pytest.mark.parametrize("name", RECORDS)
def test_a_layer_moved_off_the_cpu_takes_a_layout_that_runs_there(name: str) -> None:
    layer = _layer(name)
    assert layer.kernel in RECORDS[name][1]
    layer.to("meta")
    qw = layer.qweight
    assert layer.kernel == "dequant" and qw.packed.device.type == "meta"
    assert all(t.device.type == "meta" for t in qw.tensors("r").values())
    assert _buffers(layer) == _record_buffers(qw)  # the CPU layout's copies are gone
    assert layer.record_packed is qw.packed  # the buffers are the record: one copy
    assert layer(torch.randn(2, 3, 256, device="meta")).shape == (2, 3, 96)


@pytest.mark.parametrize("name", RECORDS)
def test_a_move_that_keeps_the_device_changes_nothing(name: str) -> None:
    """.to('cpu'), .half() and .float() on a CPU layer keep its layout, its record, the dtypes
    of its buffers (codes and scales in the layout's formats) and its output."""
    layer = _layer(name)
    layout, qw = layer.layout, layer.qweight
    record = dict(qw.tensors("r"))
    dtypes = {n: b.dtype for n, b in layer.named_buffers()}
    x = torch.randn(5, 256)
    y = layer(x)
    layer.to("cpu").float()
    assert layer.layout is layout and layer.qweight is qw
    assert all(t is record[n] for n, t in qw.tensors("r").items())
    assert torch.equal(layer(x), y)
    layer.half()  # the bias becomes float16; codes and scales stay as the layout keeps them
    assert {n: b.dtype for n, b in layer.named_buffers()} == dtypes
    torch.testing.assert_close(layer(x.half()).float(), y, rtol=0.02, atol=0.1)


def test_a_forced_kernel_stays_where_it_runs_and_gives_way_where_it_does_not() -> None:
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(96, 256), RTN(bits=4, group_size=32, sym=True))
    layer = QuantLinear(qw, kernel="int4")
    assert layer.kernel == "int4"
    assert layer.to("meta").kernel == "dequant"


def test_a_tied_embedding_and_head_keep_one_record_after_a_move() -> None:
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(64, 32), RTN(bits=8, group_size=-1, sym=True))
    tied = nn.ModuleDict({"embed": QuantEmbedding(qw), "head": QuantLinear(qw)})
    tied.to("meta")
    embed, head = tied["embed"], tied["head"]
    assert embed.qweight is head.qweight and qw.packed.device.type == "meta"
    assert embed.record_packed is head.record_packed is qw.packed
    assert head.kernel == "dequant" and head(torch.randn(3, 32, device="meta")).shape == (3, 64)


def test_an_activation_quantized_layer_moves_its_spec_too() -> None:
    torch.manual_seed(0)
    spec = static_spec(torch.tensor([-3.0]), torch.tensor([4.0]), False, "int8", "tensor")
    layer = ActQuantLinear(int8_weight(torch.randn(40, 48)), spec, torch.randn(40))
    layer.to("meta")
    assert layer.act.scale.device.type == "meta" and layer.act.zero.device.type == "meta"
    assert layer.qweight.packed.device.type == "meta"
    assert {b.device.type for b in layer.buffers()} == {"meta"}


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_bit_packing_stays_on_the_device_of_its_input(bits: int) -> None:
    q = torch.zeros(40, dtype=torch.uint8, device="meta")
    packed = pack_bits(q, bits)
    assert packed.device.type == "meta" and packed.numel() == -(-40 * bits // 8)
    assert unpack_bits(packed, bits, 40).device.type == "meta"


def test_int_mm_on_the_cpu_is_torch_int_mm() -> None:
    torch.manual_seed(0)
    a = torch.randint(-127, 128, (3, 48), dtype=torch.int8)
    b = torch.randint(-127, 128, (40, 48), dtype=torch.int8)
    assert torch.equal(int_mm(a, b.t()), a.int() @ b.int().t())
