"""The kernels' AVX2 and scalar paths, built here with AVX-512 (or AVX) disabled
(TINYLLM_KERNEL_ISA), pass the same tests as the native build: every 4-/8-bit GEMV tile against
dequantize-then-matmul, and the lean runtime's greedy tokens (fused RMSNorm, RoPE and paged
attention over float32, float16 and int8 KV) against transformers. Each build takes about a
minute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CHECKS = [
    "tests/kernels/test_qlinear.py::test_kernels_match_dequantize_then_matmul",
    "tests/runtime/test_engine.py::test_batched_greedy_matches_transformers_generate",
    "tests/runtime/test_engine.py::test_float16_kv_cache_halves_memory_and_keeps_the_tokens",
    "tests/runtime/test_engine.py::test_int8_kv_cache_halves_float16_bytes_and_keeps_the_tokens",
    "tests/runtime/test_engine.py::test_fused_int8_decode_attention_equals_the_dequantized_reference",
]
# the int8-activation kernels (--int8-act): AVX512-VNNI natively, vpmaddwd in AVX2, none in scalar
INT8_ACT = [
    "tests/kernels/test_qlinear.py::test_int8_activation_kernel_is_close_to_the_exact_product",
    "tests/kernels/test_qlinear.py::test_int8_activation_head_kernel_is_close_to_the_exact_product",
]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.slow
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_portable_kernel_paths_pass_the_kernel_tests(isa: str) -> None:
    from tinyllm.kernels.native import unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    if isa == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "TINYLLM_KERNEL_ISA": isa}
    probe = "from tinyllm.kernels import native; print(native.q4_kernel().isa())"
    built = subprocess.run(
        [sys.executable, "-c", probe],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    assert built.stdout.strip().splitlines()[-1] == isa
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKS,
         *(INT8_ACT if isa == "avx2" else [])],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout


def test_a_misspelt_isa_is_refused(monkeypatch) -> None:
    from tinyllm.errors import ConfigError
    from tinyllm.kernels.native import kernel_isa

    monkeypatch.setenv("TINYLLM_KERNEL_ISA", "avx1024")
    with pytest.raises(ConfigError, match="native, avx2, scalar"):
        kernel_isa()
    monkeypatch.setenv("TINYLLM_KERNEL_ISA", "AVX2")
    assert kernel_isa() == "avx2"
