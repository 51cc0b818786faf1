"""core/estimate.py and `tinyllm estimate`: predictions from config.json alone."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyllm.core.estimate import (
    COSTS,
    METHODS,
    Host,
    Job,
    block_memory,
    check_fits,
    compress_memory,
    estimate,
    host_profile,
    kept_replays,
    recomputed_flops,
    shape_of,
)
from tinyllm.errors import ConfigError, ModelLoadError, ModelNotFoundError, TinyLLMError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import synthetic  # noqa: E402

HOST = Host("cpu", 100.0, 10.0, False, "test")
SIZES = ["smollm2-360m", "llama-3.2-1b", "qwen2.5-1.5b", "llama-3.1-8b"]  # growing


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """config.json files of the real shapes (no weights)."""
    root = tmp_path_factory.mktemp("configs")
    paths = {}
    for name in SIZES:
        (root / name).mkdir()
        paths[name] = root / name / "config.json"
        paths[name].write_text(json.dumps(synthetic.model_config(name)))
    return paths


def test_shapes_match_the_published_parameter_counts(configs):
    counts = {name: shape_of(path).params for name, path in configs.items()}
    assert counts["smollm2-360m"] == 361_821_120
    assert counts["llama-3.1-8b"] == 8_030_261_248
    one = shape_of(configs["llama-3.2-1b"])
    assert (one.layers, one.hidden, one.ffn, one.vocab, one.tied) == (16, 2048, 8192, 128256, True)
    assert one.stored_bytes == 2  # bf16


def test_estimates_grow_with_model_size(configs):
    """Along 360M -> 1B -> 8B everything grows; Qwen2.5-1.5B serves heavier than Llama-3.2-1B
    but calibrates lighter (hidden 1536 against 2048: smaller activations)."""
    chain = ["smollm2-360m", "llama-3.2-1b", "llama-3.1-8b"]
    on = Job(stream="on")
    for job in (on, Job("eval"), Job("generate", None), Job("compress", "rtn", stream="on")):
        ests = [estimate(configs[n], job, HOST) for n in chain]
        peaks = [e.peak_bytes for e in ests]
        times = [e.seconds for e in ests]
        assert peaks[0] < peaks[1] < peaks[2], (job, peaks)
        assert times[0] < times[1] < times[2], (job, times)
    one, qwen = (estimate(configs[n], Job("eval"), HOST) for n in SIZES[1:3])
    assert one.peak_bytes < qwen.peak_bytes
    one, qwen = (estimate(configs[n], on, HOST) for n in SIZES[1:3])
    key = "calibration hidden states (x1, float32)"  # 128 x 512: too large to keep a copy
    assert qwen.memory[key] == one.memory[key] * 1536 // 2048


def test_streaming_compression_needs_far_less_than_the_float32_model(configs):
    big = estimate(configs["llama-3.1-8b"], Job(samples=16, seq_len=512, stream="on"), HOST)
    assert big.peak_bytes < 4 * big.params / 3  # a third of the float32 weights (32 GB)
    assert big.memory["method workspace (Hessians)"] > 2 * 4 * 14336**2  # down_proj's H + one
    # the embedding table (1 GB) is given back before the first block: not in the block phase
    assert "input embeddings (stored dtype)" not in big.memory
    assert any("input embeddings are held only before and after" in a for a in big.assumptions)
    for name in SIZES:  # streaming: the embeddings or one block's work, whatever the depth
        shape = shape_of(configs[name])
        job = Job(method="rtn", stream="on")
        block = sum(block_memory(shape, job, METHODS["rtn"]).values())
        embeddings = shape.vocab * shape.hidden * 2
        assert sum(compress_memory(shape, job).values()) == COSTS["baseline_bytes"] + max(
            embeddings, block
        )


def test_the_embedding_phase_is_the_peak_when_the_table_outweighs_a_block(configs):
    """Gemma-like proportions (a 262k vocabulary, small blocks): the table's phase is larger."""
    shape = dataclasses.replace(shape_of(configs["smollm2-360m"]), vocab=262144)
    parts = compress_memory(shape, Job(samples=8, seq_len=128, stream="on"))
    assert parts["input embeddings (stored dtype)"] == 262144 * shape.hidden * 2
    assert set(parts) == {
        "process baseline",
        "input embeddings (stored dtype)",
        "calibration hidden states (x1, float32)",
    }


def test_memory_parts_follow_the_settings(configs):
    shape = shape_of(configs["llama-3.2-1b"])
    a = compress_memory(shape, Job(samples=32, seq_len=256, stream="on"))
    b = compress_memory(shape, Job(samples=64, seq_len=256, stream="on"))
    key = "calibration hidden states (x2, float32)"
    assert a[key] == 32 * 256 * 2048 * 4 * 2 and b[key] == 2 * a[key]
    assert b["down_proj inputs (float16)"] == 64 * 256 * 8192 * 2
    assert a["method workspace (Hessians)"] > 2 * 4 * 8192**2  # two ffn^2 float32 matrices
    rtn = compress_memory(shape, Job(method="rtn", stream="on"))
    assert not any("calibration" in k for k in rtn) and sum(rtn.values()) < sum(a.values())


def test_kept_replays_follow_the_staged_pass_limit(configs):
    """What a staged pass keeps (core.calib.KEEP_STAGE_BYTES): at 32 x 256 a 1B block keeps
    o_proj's inputs (a second hidden-state copy) and down_proj's; at 128 x 512 neither fits, so
    the estimate holds one copy and adds the recomputed attention and MLP inputs' time."""
    shape = shape_of(configs["llama-3.2-1b"])
    small, large = Job(samples=32, seq_len=256, stream="on"), Job(stream="on")
    assert kept_replays(shape, small, METHODS["gptq"]) == (True, True)
    assert kept_replays(shape, large, METHODS["gptq"]) == (False, False)
    assert recomputed_flops(shape, small, METHODS["gptq"]) == 0
    big = estimate(configs["llama-3.2-1b"], large, HOST)
    assert "down_proj inputs (float16)" not in big.memory
    assert big.memory["calibration hidden states (x1, float32)"] == 128 * 512 * 2048 * 4
    linears = 2 * 2048 * 8192 + 2048 * (2048 + 2 * 512)  # gate + up, q + k + v
    attention = 2.0 * 128 * 512 * 512 * 2048
    want = 2.0 * 128 * 512 * linears + attention
    assert recomputed_flops(shape, large, METHODS["gptq"]) == want
    assert big.time["recomputed, not kept"] > 0


def test_stream_auto_decides_as_quantize_does(configs, monkeypatch):
    import tinyllm.util.memory

    path = configs["llama-3.2-1b"]  # 4.9 GB of float32 weights
    whole = estimate(path, Job(stream="off"), HOST)
    streamed = estimate(path, Job(stream="on"), HOST)
    assert whole.memory["the whole model in float32 (not streamed)"] == 4 * whole.params
    assert streamed.peak_bytes < whole.peak_bytes
    monkeypatch.setattr(tinyllm.util.memory, "available_bytes", lambda: 64 * 2**30)
    assert estimate(path, Job(), HOST).peak_bytes == whole.peak_bytes
    monkeypatch.setattr(tinyllm.util.memory, "available_bytes", lambda: 8 * 2**30)
    assert estimate(path, Job(), HOST).peak_bytes == streamed.peak_bytes


def test_packed_checkpoint_serves_smaller_than_float(configs):
    path = configs["llama-3.1-8b"]
    packed = estimate(path, Job("generate", "gptq", bits=4), HOST)
    plain = estimate(path, Job("generate", None), HOST)
    assert packed.peak_bytes < plain.peak_bytes / 3
    assert packed.seconds < plain.seconds  # fewer bytes per token over the same bandwidth


def test_a_too_small_budget_is_refused_with_the_numbers(configs):
    est = estimate(configs["llama-3.2-1b"], Job(), HOST)
    check_fits([est], est.peak_bytes)  # exactly enough: accepted
    with pytest.raises(ConfigError, match=r"needs about .* GiB of host memory but 1\.0 GiB"):
        check_fits([est], 2**30)


def test_bad_input_is_a_clear_error(tmp_path, configs):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        estimate(tmp_path / "nothing", Job(), HOST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model in it"):
        estimate(tmp_path / "empty", Job(), HOST)
    with pytest.raises(ConfigError, match="unknown method 'gptqq'"):
        estimate(configs["smollm2-360m"], Job(method="gptqq"), HOST)
    with pytest.raises(ConfigError, match="no cost model for 'distill'"):
        estimate(configs["smollm2-360m"], Job(method="distill"), HOST)
    with pytest.raises(ConfigError, match="stream must be one of"):
        estimate(configs["smollm2-360m"], Job(stream="maybe"), HOST)
    with pytest.raises(ConfigError, match="unknown job"):
        estimate(configs["smollm2-360m"], Job("serve"), HOST)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 10**9}))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        estimate(bad, Job(), HOST)


def test_a_gpu_job_splits_host_and_device_memory(configs):
    gpu = Host("cuda", 40_000.0, 2000.0, False, "assumed")
    est = estimate(configs["llama-3.2-1b"], Job(device="cuda", stream="on"), gpu)
    assert (
        est.device_bytes and est.device_bytes > est.memory["one block in float32 (x2 in forward)"]
    )
    assert est.peak_bytes < COSTS["baseline_bytes"] + 2**30 + COSTS["cuda_context_bytes"]


def test_host_profile_is_not_cached_from_a_busy_cpu(monkeypatch):
    """A micro-benchmark taken while the CPU is shared is used once, not kept."""
    import tinyllm.core.estimate as est

    monkeypatch.setattr(est, "_busy", lambda: "load average 9.0 on 2 cores")
    busy = host_profile("cpu", refresh=True)
    assert busy.measured and "not cached" in busy.source
    monkeypatch.setattr(est, "_busy", lambda: "")
    assert not host_profile("cpu").source.startswith("cached")  # nothing was kept


def test_host_profile_is_measured_once_then_cached(monkeypatch):
    import tinyllm.core.estimate as est

    monkeypatch.setattr(est, "_busy", lambda: "")  # (the test run may keep the CPU busy)
    first = host_profile("cpu")
    assert first.measured and first.gflops > 0 and first.bandwidth_gbs > 0
    again = host_profile("cpu")
    assert again.source.startswith("cached") and again.gflops == first.gflops


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "tinyllm.cli", "estimate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)


def test_cli_help_table_json_and_errors(configs):
    p = _cli("--help")
    assert p.returncode == 0 and "config.json" in p.stdout and "--samples" in p.stdout
    p = _cli(str(configs["smollm2-360m"]), "--samples", "16", "--json", "-")
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["job"] == "compress" and data["method"] == "gptq"
    assert data["peak_bytes"] == sum(data["memory"].values())
    p = _cli(str(configs["smollm2-360m"]), "--method", "nope")
    assert p.returncode == 1 and "unknown method 'nope'" in p.stderr
    assert "Traceback" not in p.stderr


def test_errors_are_tinyllm_errors():
    assert issubclass(ConfigError, TinyLLMError) and issubclass(ModelLoadError, TinyLLMError)


def test_a_tinyllm_checkpoint_serves_at_its_files_size(configs, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(configs["smollm2-360m"].read_text())
    (ckpt / "tinyllm.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 123_456)
    est = estimate(ckpt, Job("generate", None), HOST)
    assert est.memory["weights (the checkpoint's files)"] == 123_456
    hf = estimate(configs["smollm2-360m"], Job("generate", None), HOST)
    assert hf.memory["weights in 32-bit floats (as loaded)"] == 4 * hf.params
