import pytest
import torch

from tinyllm.kernels.qlinear import QuantLinear
from tinyllm.quant.rtn import RTN, rtn_quantize


@pytest.mark.parametrize(
    ("bits", "group", "sym", "kernel"),
    [
        (4, 32, True, "q4"),
        (4, 64, False, "q4"),
        (4, -1, False, "q4"),
        (4, 32, True, "int4"),
        (4, 128, False, "int4"),
        (8, -1, True, "q8"),
        (8, -1, True, "int8"),
        (3, 32, False, "dequant"),
        (5, 64, True, "dequant"),
        (2, -1, False, "dequant"),
        (8, 32, False, "dequant"),
    ],
)
def test_kernels_match_dequantize_then_matmul(bits, group, sym, kernel):
    torch.manual_seed(0)
    w, b = torch.randn(96, 256), torch.randn(96)
    qw = rtn_quantize(w, RTN(bits=bits, group_size=group, sym=sym))
    chosen = QuantLinear(qw, b).kernel
    ours = {"int4": "q4", "int8": "q8"}  # tinyllm's kernels come first when they build
    assert chosen == kernel or chosen == ours.get(kernel)
    layer = QuantLinear(qw, b, kernel=kernel)
    # 3, 7 (tiles of 4, 2, 1), 16 (tiles of 8) rows take the packed kernel; 80 rows unpack
    sizes = [(1, 3, 256), (7, 256), (2, 8, 256), (2, 40, 256)]
    for x in (torch.randn(*s) for s in sizes):
        ref = x @ qw.dequantize().t() + b
        torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)


def test_q4_kernel_is_chosen_only_for_whole_lane_groups():
    """tinyllm's kernel (and PyTorch's) take 16 output rows at a time; others dequantize."""
    qw = rtn_quantize(torch.randn(90, 256), RTN(bits=4, group_size=64))
    assert QuantLinear(qw).kernel == "dequant"
    assert QuantLinear(rtn_quantize(torch.randn(96, 256), RTN(bits=4, group_size=64))).kernel == (
        "q4"
    )


def test_single_token_decode_shape():
    qw = rtn_quantize(torch.randn(64, 128), RTN(bits=4, group_size=32))
    assert QuantLinear(qw)(torch.randn(1, 1, 128)).shape == (1, 1, 64)


@pytest.mark.parametrize(("group", "sym"), [(32, True), (64, False), (-1, False)])
def test_int8_activation_kernel_is_close_to_the_exact_product(group, sym):
    """q4_gemv_i8 rounds activations to int8 per block of 32: about 0.5% relative error."""
    from tinyllm.kernels import native

    k = native.q4_kernel()
    if k is None or not k.q4_i8_supported():
        pytest.skip("needs tinyllm's native kernels with AVX512-VNNI or AVX2")
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(96, 256), RTN(bits=4, group_size=group, sym=sym))
    layer = QuantLinear(qw)
    for m in (1, 5, 16):  # tiles of 1, 4 and 8 rows
        x = torch.randn(m, 256)
        ref = x @ qw.dequantize().float().t()
        y = k.q4_gemv_i8(x, layer.w_q4, layer.w_q4_scale, layer.w_q4_zero, qw.effective_group)
        rel = ((y - ref).norm() / ref.norm()).item()
        assert 1e-4 < rel < 0.015  # not exact, but close


def test_int8_activation_head_kernel_is_close_to_the_exact_product():
    from tinyllm.kernels import native

    k = native.q4_kernel()
    if k is None or not k.q4_i8_supported():
        pytest.skip("needs tinyllm's native kernels with AVX512-VNNI or AVX2")
    torch.manual_seed(0)
    qw = rtn_quantize(torch.randn(160, 256), RTN(bits=8, group_size=-1, sym=True))
    layer = QuantLinear(qw)
    assert layer.kernel == "q8"
    for m in (1, 6, 16):
        x = torch.randn(m, 256)
        ref = x @ qw.dequantize().float().t()
        rel = ((k.q8_gemv_i8(x, layer.w_q8, layer.w_q8_scale) - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < 0.015


def test_verified_int8_head_gives_the_exact_argmax_where_int8_alone_does_not():
    """q8_argmax_fix: the int8-activation head's error stays within its bound everywhere, the
    candidates it recomputes equal the exact product (the row maxima included), and each row's
    argmax is the exact one, on a head built so that int8 activations alone pick wrong tokens:
    token t reads one input k(t) next to an outlier, where int8 steps are coarse."""
    from tinyllm.kernels import native
    from tinyllm.runtime.model import _block_l1

    k = native.q4_kernel()
    if k is None or not k.q4_i8_supported():
        pytest.skip("needs tinyllm's native kernels with AVX512-VNNI or AVX2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g)
    x[:, ::37] = 300.0  # an outlier in 7 of the 8 blocks of 32
    reads = [i for i in range(224) if i % 37]  # the other inputs of those blocks
    w = torch.zeros(224, 256)  # 224 tokens (14 lanes of 16): token t reads input reads[t]
    w[torch.arange(len(reads)), torch.tensor(reads)] = 1.0
    layer = QuantLinear(rtn_quantize(w, RTN(bits=8, group_size=-1, sym=True)))
    packed = layer.packed()
    l1 = _block_l1(packed)
    codes, scale = packed["w_q8"], packed["w_q8_scale"]
    exact = k.q8_gemv(x, codes, scale)
    torch.testing.assert_close(exact[:, : len(reads)], x[:, reads])  # the head reads x exactly
    approx = k.q8_gemv_i8(x, codes, scale)
    amax = x.abs().view(16, 8, 32).amax(-1)
    bound = (amax * l1).sum(-1, keepdim=True) * (1 / 254 + (256 + 8) * 2**-23)
    assert ((approx - exact).abs() <= bound).all()
    assert (approx.argmax(-1) != exact.argmax(-1)).sum() >= 4  # int8 alone misses
    fixed, counts = approx.clone(), torch.empty(16, dtype=torch.long)
    assert k.q8_argmax_fix(x, codes, scale, l1, fixed, 224, counts) == 0
    assert torch.equal(fixed.argmax(-1), exact.argmax(-1))
    torch.testing.assert_close(fixed.amax(-1), exact.amax(-1), rtol=1e-6, atol=1e-6)
    redone = fixed != approx
    assert (counts > 0).all() and redone.any()
    torch.testing.assert_close(fixed[redone], exact[redone], rtol=1e-6, atol=1e-6)
    # a row with more candidates than the cap, or non-finite input, is left for q8_gemv
    x[3, 5] = float("nan")
    again = k.q8_gemv_i8(x, codes, scale)
    assert k.q8_argmax_fix(x, codes, scale, l1, again, 224, counts) == 1 and counts[3] == -1
    assert k.q8_argmax_fix(x, codes, scale, l1, again, 1, counts) == 16


def test_a_kernel_build_killed_midway_does_not_hang_later_builds(tmp_path):
    """torch's build baton is a plain file: a builder killed while holding it used to make every
    later process wait forever. Our flock dies with its holder, and under it the baton is stale."""
    import subprocess
    import sys
    import time

    from tinyllm.kernels.native import build_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from tinyllm.kernels.native import build_lock\n"
         f"with build_lock(Path({str(tmp_path)!r})):\n"
         f"    Path({str(tmp_path / 'lock')!r}).touch()\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # dies mid-"build", leaving torch's baton behind
    holder.wait()
    assert (tmp_path / "lock").exists()
    t0 = time.perf_counter()
    with build_lock(tmp_path):  # neither waits on the dead holder nor keeps its baton
        assert not (tmp_path / "lock").exists()
    assert time.perf_counter() - t0 < 5
