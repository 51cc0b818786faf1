"""The command line: results, and one-line errors with a non-zero exit for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXPECTED_KEYS = [
    "model",
    "corpus",
    "seq_len",
    "windows",
    "tokens",
    "perplexity",
    "kld",
    "top1_agreement",
    "params",
    "size_bytes",
    "bits_per_weight",
    "sparsity",
    "eval_seconds",
    "tokens_per_second",
    "peak_rss_bytes",
    "energy_joules",
    "joules_per_token",
    "energy_source",
    "tasks",
]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "tinyllm.cli", *args], capture_output=True, text=True, env=env
    )


def assert_clean_error(p: subprocess.CompletedProcess, pattern: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout
    assert pattern in p.stderr, p.stderr


def eval_against(model: Path, reference: Path, corpus: Path, windows: int, *extra: str):
    """`tinyllm eval MODEL --reference REFERENCE` on short windows of `corpus`."""
    args = ["--corpus", str(corpus), "--seq-len", "16", "--windows", str(windows)]
    return run("eval", str(model), *args, "--reference", str(reference), *extra)


def test_eval_json(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    out = tmp_path / "r.json"
    p = eval_against(tiny_dir, tiny_dir, corpus_file, 3, "--json", str(out))
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    assert list(data) == EXPECTED_KEYS
    assert data["kld"] == pytest.approx(0.0, abs=1e-6) and data["top1_agreement"] == 1.0
    assert "perplexity" in p.stdout


def test_info(tiny_dir: Path):
    p = run("info", str(tiny_dir))
    assert p.returncode == 0, p.stderr
    assert "LlamaForCausalLM" in p.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/no/such/model"], "no such file or directory"),
        (["eval", "smollm2-135m", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["info", "/"], "no model in it"),
    ],
)
def test_errors_are_one_line(args, message):
    assert_clean_error(run(*args), message)


def test_empty_corpus(tiny_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_clean_error(run("eval", str(tiny_dir), "--corpus", str(empty)), "empty")


def test_short_corpus(tiny_dir: Path, corpus_file: Path):
    assert_clean_error(run("eval", str(tiny_dir), "--corpus", str(corpus_file)), "too short")


def test_reference_with_other_tokenizer(tiny_dir: Path, tmp_path: Path, corpus_file: Path):
    from tests.conftest import tiny_model, tiny_tokenizer

    other_tok = tiny_tokenizer(text="another text entirely, with other merges " * 60)
    other = tmp_path / "other"
    tiny_model(vocab=len(other_tok)).save_pretrained(other)
    other_tok.save_pretrained(other)
    assert_clean_error(eval_against(tiny_dir, other, corpus_file, 2), "different tokenizer")


def test_no_blocks_found(tmp_path: Path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 uses Conv1D, not nn.Linear: tinyllm finds no linear layers in its blocks.
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    ).save_pretrained(d)
    tokenizer.save_pretrained(d)
    assert_clean_error(run("info", str(d)), "no decoder blocks")


def test_quantize_then_eval(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    out = tmp_path / "q"
    p = run(
        "quantize",
        str(tiny_dir),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--calib-corpus",
        str(corpus_file),
        "--samples",
        "4",
        "--seq-len",
        "32",
        "--calib-dtype",
        "bfloat16",
        "--float-targets",
        "0.25",
        "--true-sequential",
        "--weighted-grid",
        "--refit-scales",
        "2",
        "-o",
        str(out),
    )
    assert p.returncode == 0, p.stderr
    meta = json.loads((out / "tinyllm.json").read_text())
    assert meta["steps"][0]["type"] == "gptq" and meta["steps"][0]["group_size"] == 32
    assert meta["steps"][0]["float_targets"] == 0.25
    assert meta["steps"][0]["true_sequential"] and meta["steps"][0]["weighted_grid"]
    assert meta["steps"][0]["refit_scales"] == 2
    assert meta["calibration"]["samples"] == 4 and meta["calibration"]["dtype"] == "bfloat16"
    assert len(json.loads((out / "layer_errors.json").read_text())) == 14
    p = run("eval", str(out), "--corpus", str(corpus_file), "--seq-len", "16", "--windows", "2")
    assert p.returncode == 0, p.stderr
    # refuses to overwrite without --overwrite
    p = run("quantize", str(tiny_dir), "--method", "rtn", "-o", str(out))
    assert_clean_error(p, "--overwrite")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "rtn", "--bits", "6"], "bits must be one of"),
        (["--method", "rtn", "--group-size", "48"], "group_size must be one of"),
        (["--method", "nope"], "unknown method"),
        (["--method", "gptq", "--calib-dtype", "fp8"], "--calib-dtype must be one of"),
        (["--method", "gptq", "--float-targets", "2"], "float_targets"),
        (["--method", "gptq", "--refit-scales", "9"], "--refit-scales"),
    ],
)
def test_quantize_bad_settings(tiny_dir: Path, tmp_path: Path, args, message):
    assert_clean_error(run("quantize", str(tiny_dir), "-o", str(tmp_path / "o"), *args), message)


def test_quantize_calibration_too_small(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    p = run(
        "quantize",
        str(tiny_dir),
        "--method",
        "gptq",
        "--calib-corpus",
        str(corpus_file),
        "-o",
        str(tmp_path / "o"),
    )
    assert_clean_error(p, "too small")


def test_gguf_compatible_quantize_then_strict_export(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path
):
    out = tmp_path / "q"
    calib = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32"]
    p = run("quantize", str(tiny_dir), "--method", "awq", "--base", "gptq", *calib,
            "--gguf-compatible", "q4_0", "-o", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    awq = json.loads((out / "tinyllm.json").read_text())["steps"][0]
    step = awq["base"]
    assert (step["bits"], step["group_size"], step["sym"]) == (4, 32, True)
    assert awq["base_search"] is False  # the base quantizes on AWQ's clamped range
    gguf = tmp_path / "q.gguf"
    p = run("export", str(out), "--type", "q4_0", "--strict", "-o", str(gguf))
    assert p.returncode == 0, p.stderr
    assert "14 layers carried, 0 re-quantized" in p.stdout
    assert_clean_error(run("export", str(out), "-o", str(gguf)), "--overwrite")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--type", "q4_x"], "unknown GGUF type"),
        (["--format", "tflite"], "unknown export format"),
    ],
)
def test_export_bad_settings(tiny_dir: Path, tmp_path: Path, args, message):
    assert_clean_error(run("export", str(tiny_dir), "-o", str(tmp_path / "m.gguf"), *args), message)


def test_export_errors(tiny_dir: Path, tmp_path: Path):
    assert_clean_error(run("export", str(tiny_dir), "-o", str(tmp_path / "no" / "m.gguf")),
                       "does not exist")  # fmt: skip
    p = run("quantize", str(tiny_dir), "--method", "gptq", "--gguf-compatible", "q7_k",
            "-o", str(tmp_path / "q"))  # fmt: skip
    assert_clean_error(p, "--gguf-compatible: choose one of q4_0")
    p = run("quantize", str(tiny_dir), "--method", "rtn", "--bits", "3", "-o", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    p = run("export", str(tmp_path / "r"), "--type", "q4_0", "--strict", "-o", str(tmp_path / "x"))
    assert_clean_error(p, "cannot store as Q4_0 without re-quantizing (3-bit codes")


def test_export_type_mix(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    """--type mix: a GGUF type per block linear by measured KL under --target-bpw, every code
    carried; clear errors for a missing budget, a quantized model and another format."""
    from gguf import GGUFReader

    calib = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32"]
    gguf = tmp_path / "mix.gguf"
    p = run("export", str(tiny_dir), "--type", "mix", "--target-bpw", "6", *calib, "-o", str(gguf))
    assert p.returncode == 0, p.stderr
    assert "chose" in p.stdout and "14 layers carried, 0 re-quantized" in p.stdout
    blocks = [t for t in GGUFReader(str(gguf)).tensors if t.name.startswith("blk.")]
    kinds = {t.tensor_type.name for t in blocks if len(t.shape) > 1}
    assert kinds <= {"Q4_0", "Q5_0", "Q8_0"} and len(kinds) >= 2  # 64-wide rows: no K type
    bits = sum(int(t.n_bytes) * 8 for t in blocks if len(t.shape) > 1)
    assert bits <= 6 * sum(int(t.n_elements) for t in blocks if len(t.shape) > 1)
    out = tmp_path / "m2.gguf"
    assert_clean_error(run("export", str(tiny_dir), "--type", "mix", "-o", str(out)),
                       "--type mix needs --target-bpw")  # fmt: skip
    p = run("export", str(tiny_dir), "--format", "onnx", "--type", "mix", "--target-bpw", "5",
            "-o", str(tmp_path / "m.onnx"))  # fmt: skip
    assert_clean_error(p, "drop it for --format onnx")
    p = run("quantize", str(tiny_dir), "--method", "rtn", "-o", str(tmp_path / "r"))
    assert p.returncode == 0, p.stderr
    p = run("export", str(tmp_path / "r"), "--type", "mix", "--target-bpw", "5", *calib,
            "-o", str(out))  # fmt: skip
    assert_clean_error(p, "quantized")


def test_quantize_layout_from_a_gguf_file(tiny_dir: Path, corpus_file: Path, tmp_path: Path):
    """--layout-from: GPTQ codes on exactly the per-tensor types of an existing GGUF file; the
    export holds the same type in every tensor."""
    from gguf import GGUFReader

    calib = ["--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32"]
    peer = tmp_path / "peer.gguf"
    p = run("export", str(tiny_dir), "--type", "mix", "--target-bpw", "6", *calib, "-o", str(peer))
    assert p.returncode == 0, p.stderr
    p = run("quantize", str(tiny_dir), "--method", "mixed", "--base", "gptq", *calib,
            "--layout-from", str(peer), "-o", str(tmp_path / "q"))  # fmt: skip
    assert p.returncode == 0, p.stderr
    ours = tmp_path / "ours.gguf"
    p = run("export", str(tmp_path / "q"), "--type", "auto", "--strict", "-o", str(ours))
    assert p.returncode == 0, p.stderr

    def types(path: Path) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}

    assert types(ours) == types(peer) and len(set(types(ours).values())) >= 3
    p = run("quantize", str(tiny_dir), "--method", "mixed", "--layout-from", str(corpus_file),
            "-o", str(tmp_path / "bad"))  # fmt: skip
    assert_clean_error(p, "is not a GGUF file")


def test_generate_streams_and_reports(tiny_dir: Path):
    p = run("generate", str(tiny_dir), "The quick", "--max-tokens", "5", "--temperature", "0.8",
            "--seed", "3")  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "tokens, finish:" in p.stderr
    again = run("generate", str(tiny_dir), "The quick", "--max-tokens", "5", "--temperature",
                "0.8", "--seed", "3")  # fmt: skip
    assert again.stdout == p.stdout  # seeded sampling repeats


def test_generate_with_a_draft_model_gives_plain_greedy_output(tiny_dir: Path):
    args = ("generate", str(tiny_dir), "The quick", "--max-tokens", "8")
    plain, spec = run(*args), run(*args, "--draft", str(tiny_dir))
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "{d}", "hi", "--draft", "/no/such/model"], "/no/such/model"),
        (["generate", "{d}", "hi", "--chat"], "no chat template"),
        (["generate", "{d}", "hi", "--max-tokens", "100000"], "exceeds the context"),
        (["generate", "{d}", "hi", "--kv-memory", "0.0001"], "holds no block"),
        (["bench", "{d}", "--concurrency", "1,x"], "--concurrency takes numbers"),
        (["serve", "{d}", "--tenants", "/no/such.yaml"], "cannot read tenants"),
    ],
)
def test_runtime_commands_bad_input(tiny_dir: Path, args, message):
    assert_clean_error(run(*[a.replace("{d}", str(tiny_dir)) for a in args]), message)


def test_bench_prints_latency_table(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "bench.json"
    p = run("bench", str(tiny_dir), "--concurrency", "1,3", "--prompt-len", "8", "--gen-len", "6",
            "--repeats", "1", "--json", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())
    assert [r["concurrency"] for r in rows] == [1, 3]
    assert all(r["tokens_per_s"] > 0 and r["itl_p95_ms"] >= r["itl_p50_ms"] for r in rows)
    assert "KV bytes per token" in p.stdout


def test_eval_tasks_report_accuracy_with_its_error(tiny_dir: Path, corpus_file: Path, tmp_path):
    out = tmp_path / "r.json"
    extra = ("--tasks", "polarity,analogy", "--task-limit", "4", "--json", str(out))
    p = eval_against(tiny_dir, tiny_dir, corpus_file, 2, *extra)
    assert p.returncode == 0, p.stderr
    tasks = json.loads(out.read_text())["tasks"]
    assert set(tasks) == {"polarity", "analogy"} and tasks["polarity"]["n"] == 4
    assert "task polarity" in p.stdout and "+-" in p.stdout


def test_eval_unknown_task_is_a_clear_error(tiny_dir: Path):
    p = run("eval", str(tiny_dir), "--tasks", "polarity,nope")
    assert_clean_error(p, "unknown task 'nope'")


def test_error_text_in_brackets_is_printed_not_taken_as_markup(tiny_dir: Path):
    p = run("eval", str(tiny_dir), "--gate", "task:[x]>=0.5")
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "[x]" in p.stderr, p.stderr
