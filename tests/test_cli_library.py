"""What the thin CLI calls lives in the library: each piece works (and refuses bad input) alone.

Also: options a command does not read for the chosen format or model are errors, not ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.conftest import tiny_model
from tests.test_cli import assert_clean_error, run
from tinyllm.errors import ConfigError


def test_bench_levels_and_table_cells() -> None:
    from tinyllm.runtime.bench import COLUMNS, BenchRow, bench_scheduler, parse_levels

    assert parse_levels("1, 4,16") == [1, 4, 16]
    for bad in ("1,x", "", "0,2", "-1"):
        with pytest.raises(ConfigError, match="--concurrency takes"):
            parse_levels(bad)
    sched = bench_scheduler([1, 8, 3])
    assert (sched.max_batch, sched.max_queue) == (8, 16)
    row = BenchRow(4, 64, 32, 123.456, 150.04, 12.6, 20.0, 3.25, 5.5, 7.75, 1.5, 23040)
    cells = row.cells()
    assert len(cells) == len(COLUMNS)
    assert cells == ("4", "123.5", "150.0", "13", "3.2", "5.5", "7.8", "1.5", "n/a")
    row.joules_per_token = 0.01234567  # measured: J per generated token, 4 significant digits
    assert row.cells()[-1] == "0.01235"


def test_engine_generate_streams_to_a_sink_and_reports_its_rate(tokenizer) -> None:
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams

    engine = Engine(tiny_model(), tokenizer, EngineConfig(kv_memory_mb=1))
    events = []
    [seq] = engine.generate([tokenizer.encode("The quick")], SamplingParams(max_tokens=5,
                            ignore_eos=True), sink=events.append)  # fmt: skip
    assert len(seq.output) == 5 and seq.finish_reason == "length"
    assert "".join(e.text for e in events) == seq.text
    assert events[-1].finish_reason == "length"
    t = seq.token_times
    assert seq.decode_tokens_per_s == pytest.approx(4 / (t[-1] - t[0]))
    seq.token_times = t[:1]
    assert math.isnan(seq.decode_tokens_per_s)


def test_int8_activations_on_the_fallback_are_refused(tokenizer) -> None:
    from tinyllm.runtime.engine import Engine, EngineConfig

    model = tiny_model("opt")  # not in the lean forward's table: runs on transformers
    assert Engine(model, tokenizer, EngineConfig(kv_memory_mb=1)).fallback
    with pytest.raises(ConfigError, match="--int8-act"):
        Engine(model, tokenizer, EngineConfig(kv_memory_mb=1, int8_activations=True))


def test_load_engine_takes_a_model_spec(tiny_dir: Path) -> None:
    from tinyllm.runtime.engine import EngineConfig, load_engine

    engine = load_engine(str(tiny_dir), EngineConfig(kv_memory_mb=2, kv_dtype="float32"))
    assert engine.fallback is None and engine.cfg.kv_memory_mb == 2


def test_server_keys_refuses_an_open_bind_before_loading(tmp_path: Path, monkeypatch) -> None:
    from tinyllm.runtime.server import KEYS_ENV, server_keys

    monkeypatch.delenv(KEYS_ENV, raising=False)
    assert server_keys("127.0.0.1", False, []) is None
    with pytest.raises(ConfigError, match="exposes the server"):
        server_keys("0.0.0.0", False, [])
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-a\n# a comment\nsk-b\n")
    found = server_keys("0.0.0.0", False, ["sk-c"], str(keys))
    assert sorted(found) == ["sk-a", "sk-b", "sk-c"]


def test_export_options_a_format_does_not_read_are_errors(tmp_path: Path) -> None:
    from tinyllm.export import check_options

    check_options("gguf", "q4_0", "q8_0")
    check_options("onnx", "q4", None)
    check_options("hf", None, None)
    with pytest.raises(ConfigError, match="hf export takes no type"):
        check_options("hf", "q4_0")
    for fmt in ("onnx", "hf"):
        with pytest.raises(ConfigError, match="GGUF exports only"):
            check_options(fmt, None, "q8_0")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "hf", "--type", "q4_0"], "hf export takes no type"),
        (["--format", "onnx", "--embed-type", "q8_0"], "GGUF exports only"),
    ],
)
def test_cli_export_refuses_ignored_options(tiny_dir: Path, tmp_path: Path, args, message):
    assert_clean_error(run("export", str(tiny_dir), "-o", str(tmp_path / "m"), *args), message)


def test_export_summary_counts_what_was_carried(tiny_dir: Path, tmp_path: Path) -> None:
    import tinyllm
    from tinyllm.export import export, summary

    model, tok = tinyllm.load(str(tiny_dir))
    path = tmp_path / "m.gguf"
    line = summary(path, "gguf", export(model, tok, path, "gguf", "f16"))
    assert line.startswith(f"wrote {path} (") and line.endswith("0 layers carried, 0 re-quantized")


def test_plan_settings_are_checked_before_loading() -> None:
    from tinyllm.pipeline.planner import plan_settings

    cal, ev = plan_settings({"samples": 4, "seq_len": 32}, {"windows": 2}, verify_top=1)
    assert (cal.samples, cal.seq_len, ev.windows) == (4, 32, 2)
    with pytest.raises(ConfigError, match="plan: seq_len"):
        plan_settings({"seq_len": 4}, {}, verify_top=1)
    with pytest.raises(ConfigError, match="--verify-top must be at least 1"):
        plan_settings({}, {}, verify_top=0)


def test_recipe_outline_and_stage_line() -> None:
    from tinyllm.pipeline.recipe import parse_recipe
    from tinyllm.pipeline.report import stage_line

    rec = parse_recipe(
        "model: m\nstages:\n  - {type: gptq, bits: 4}\nexport: [{format: gguf, type: q4_0}, "
        "{format: hf}]\n"
    )
    assert rec.outline() == ["1. gptq {'bits': 4}", "export gguf q4_0", "export hf"]
    r = {"index": 1, "type": "gptq", "seconds": 12.4, "weights_bytes": 3 * 2**20,
         "eval": {"perplexity": 10.12345, "kld": 0.01234}}  # fmt: skip
    assert stage_line(r) == "stage 1 gptq: perplexity 10.123, KLD 0.0123, 3.0 MiB on disk, 12 s"


def test_run_refuses_resume_with_overwrite(tmp_path: Path) -> None:
    from tinyllm.pipeline.recipe import RecipeError, parse_recipe
    from tinyllm.pipeline.runner import prepare_output

    rec = parse_recipe("model: m\nstages: [{type: rtn}]\n")
    with pytest.raises(RecipeError, match="pass one of them"):
        prepare_output(tmp_path / "run", rec, "", resume=True, overwrite=True)


def test_run_check_refuses_options_it_would_ignore() -> None:
    assert_clean_error(run("run", "edge", "--check", "--resume"), "--check only validates")
    p = run("run", "edge", "--check")
    assert p.returncode == 0, p.stderr
    assert "valid; model" in p.stdout and "1. gptq" in p.stdout
