"""The trainer on a tiny model: outputs, bit-for-bit resume, Ctrl-C, bad input, QAT, the teacher
cache, feature matching through a projector, and two processes under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.test_cli import assert_clean_error, run
from tinyllm.distill import trainer as tr
from tinyllm.errors import ConfigError

SMALL = dict(
    steps=6,
    batch=2,
    seq_len=32,
    lr=1e-3,
    eval_every=3,
    eval_windows=2,
    eval_seq_len=32,
    final_eval_windows=2,
    save_every=2,
)


def _train(teacher: Path, corpus: Path, out: Path, student=None, layers=2, resume=False, **kw):
    cfg = tr.DistillConfig(**{**SMALL, "corpus": str(corpus), **kw})
    run_, meta = tr.make_run(str(teacher), student, layers, cfg, out, resume=resume)
    return tr.distill(run_, cfg, resume=resume, save_meta=meta)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint" / "trainable.safetensors"))


def test_run_writes_student_logs_and_summary(teacher_dir, corpus, tmp_path) -> None:
    import tinyllm

    out = tmp_path / "run"
    summary = _train(teacher_dir, corpus, out, beta=0.1)
    for name in ("log.csv", "log.json", "summary.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    logged = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in logged["steps"]] == list(range(1, 7))
    assert [r["step"] for r in logged["evals"]] == [3, 6]
    assert {"kd", "task", "loss", "lr", "tokens_per_s"} <= set(logged["steps"][0])
    assert summary["after"]["kld"] < summary["before"]["kld"]  # it learned something
    model, _ = tinyllm.load(out / "model")
    assert model.config.num_hidden_layers == 2
    again = tinyllm.evaluate(
        model, tinyllm.load(teacher_dir)[1], corpus=corpus, seq_len=32, windows=2
    )
    assert again.perplexity == pytest.approx(summary["after"]["perplexity"], rel=1e-5)


def test_interrupt_then_resume_is_bit_for_bit(teacher_dir, corpus, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    _train(teacher_dir, corpus, straight)
    original = tr.Trainer._train_step

    def step_then_ctrl_c(self):
        row = original(self)
        if self.step == 2:  # Ctrl-C arrives during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return row

    broken = tmp_path / "broken"
    monkeypatch.setattr(tr.Trainer, "_train_step", step_then_ctrl_c)
    with pytest.raises(tr.TrainingInterrupted, match="after step 3"):
        _train(teacher_dir, corpus, broken)
    monkeypatch.setattr(tr.Trainer, "_train_step", original)
    assert json.loads((broken / "checkpoint" / "state.json").read_text())["step"] == 3
    _train(teacher_dir, corpus, broken, resume=True)
    a, b = _weights(straight), _weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = json.loads((straight / "log.json").read_text())["steps"]
    lb = json.loads((broken / "log.json").read_text())["steps"]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


def test_resume_refuses_changed_settings_and_damaged_checkpoints(teacher_dir, corpus, tmp_path):
    out = tmp_path / "run"
    _train(teacher_dir, corpus, out)
    with pytest.raises(ConfigError, match=r"lr: 0.001 -> 0.002"):
        _train(teacher_dir, corpus, out, resume=True, lr=2e-3)
    with pytest.raises(ConfigError, match="--resume to continue"):
        _train(teacher_dir, corpus, out)
    path = out / "checkpoint" / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(tr.TrainingError, match="corrupted"):
        _train(teacher_dir, corpus, out, resume=True)
    with pytest.raises(ConfigError, match="no training checkpoint"):
        _train(teacher_dir, corpus, tmp_path / "empty", resume=True)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    teacher_dir, corpus, tmp_path, monkeypatch
):
    real = tr.losses.kd_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(tr.losses, "kd_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(tr.TrainingError, match=r"nan at step 3.*\(step 2\)"):
        _train(teacher_dir, corpus, out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2


def test_qat_student_is_saved_packed_with_its_grid(teacher_dir, corpus, tmp_path) -> None:
    import tinyllm
    from tinyllm.kernels.qlinear import QuantLinear

    model, tok = tinyllm.load(teacher_dir)
    tinyllm.quantize(model, tinyllm.RTN(bits=3, group_size=32, sym=False))
    qdir = tinyllm.save_checkpoint(model, tok, tmp_path / "q3", {"steps": [{"type": "rtn"}]})
    out = tmp_path / "qat"
    summary = _train(teacher_dir, corpus, out, student=str(qdir), layers=None, lr=1e-3)
    trained, _ = tinyllm.load(out / "model")
    layers = [m for m in trained.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 4 * 7 and all(m.qweight.bits == 3 for m in layers)
    before = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    changed = sum(  # scales (and, with longer training, codes) moved
        not torch.equal(m.qweight.dequantize(), before[n].dequantize())
        for n, m in trained.named_modules()
        if isinstance(m, QuantLinear)
    )
    assert changed > 0
    assert summary["after"]["kld"] < summary["before"]["kld"]
    steps = json.loads((out / "model" / "tinyllm.json").read_text())["steps"]
    assert [s["type"] for s in steps] == ["rtn", "distill"]


def test_qat_scales_only_and_scale_lr(teacher_dir, corpus, tmp_path) -> None:
    """--train scales moves scales and norms, never the latent weights or embeddings; --scale-lr
    puts scales and 1-D parameters in their own optimizer group."""
    import tinyllm
    from tinyllm.quant.qat import FakeQuantLinear

    model, tok = tinyllm.load(teacher_dir)
    tinyllm.quantize(model, tinyllm.RTN(bits=3, group_size=32, sym=False))
    qdir = tinyllm.save_checkpoint(model, tok, tmp_path / "q3", {"steps": [{"type": "rtn"}]})
    cfg = tr.DistillConfig(**{**SMALL, "corpus": str(corpus), "train": "scales", "lr": 3e-3})
    run_, _ = tr.make_run(str(teacher_dir), str(qdir), None, cfg, tmp_path / "s")
    fq = [m for m in run_.student.modules() if isinstance(m, FakeQuantLinear)]
    weights = [m.weight.detach().clone() for m in fq]
    scales = [m.log_scale.detach().clone() for m in fq]
    embed = run_.student.get_input_embeddings().weight.detach().clone()
    tr.distill(run_, cfg)
    assert all(torch.equal(m.weight, w) for m, w in zip(fq, weights, strict=True))
    # frozen: only the float16 rounding of the saved checkpoint touched it
    assert torch.equal(run_.student.get_input_embeddings().weight, embed.half().float())
    assert sum(not torch.equal(m.log_scale, s) for m, s in zip(fq, scales, strict=True)) > 0

    cfg = tr.DistillConfig(**{**SMALL, "corpus": str(corpus), "lr": 1e-4, "scale_lr": 3e-3})
    run_, _ = tr.make_run(str(teacher_dir), str(qdir), None, cfg, tmp_path / "b")
    groups = tr.Trainer(run_, cfg).opt.param_groups
    assert [g["initial_lr"] for g in groups] == [1e-4, 3e-3]
    assert all(p.ndim == 2 for p in groups[0]["params"])  # latent weights, embeddings
    assert len(groups[1]["params"]) == 4 * 7 + 4 * 2 + 1  # log-scales, block norms, final norm


def test_teacher_cache_with_full_vocabulary_matches_live_teacher(
    teacher_dir, corpus, tmp_path, tokenizer
) -> None:
    live = _train(teacher_dir, corpus, tmp_path / "live", steps=3, eval_every=0)
    kw = dict(steps=3, eval_every=0, teacher_cache=True, topk=len(tokenizer))
    cached = _train(teacher_dir, corpus, tmp_path / "cached", **kw)
    again = _train(teacher_dir, corpus, tmp_path / "again", **kw)  # read from disk
    steps = [
        json.loads((tmp_path / d / "log.json").read_text())["steps"]
        for d in ("live", "cached", "again")
    ]
    for a, b, c in zip(*steps, strict=True):
        assert b["kd"] == pytest.approx(a["kd"], rel=2e-3)  # logits stored as float16
        assert c["kd"] == b["kd"]
    assert cached["after"]["perplexity"] == again["after"]["perplexity"]
    assert live["after"]["perplexity"] == pytest.approx(cached["after"]["perplexity"], rel=1e-3)


def test_feature_and_attention_losses_through_a_projector(tmp_path, corpus, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab=len(tokenizer))
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = 32, 4, 2
    student_dir = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    teacher = tmp_path / "teacher"
    cfg = tiny_config("llama", vocab=len(tokenizer))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    out = tmp_path / "run"
    _train(
        teacher,
        corpus,
        out,
        student=str(student_dir),
        layers=None,
        gamma=1.0,
        delta=0.5,
        beta=0.1,
        steps=3,
    )
    keys = _weights(out).keys()
    assert {"projectors.0.weight", "projectors.1.weight"} <= set(keys)
    row = json.loads((out / "log.json").read_text())["steps"][0]
    assert row["feature"] > 0 and row["attention"] > 0


def test_cli_bad_input_is_one_line(teacher_dir, corpus, tmp_path) -> None:
    base = ["distill", "--teacher", str(teacher_dir), "--corpus", str(corpus), "-o"]
    p = run(*base, str(tmp_path / "a"), "--layers", "2", "--temperature", "0")
    assert_clean_error(p, "temperature")
    p = run(*base, str(tmp_path / "b"), "--layers", "9")
    assert_clean_error(p, "between 1 and the teacher's 4")
    p = run(*base, str(tmp_path / "c"))
    assert_clean_error(p, "give a student")
    p = run(*base, str(tmp_path / "d"), "--layers", "2", "--alpha", "0")
    assert_clean_error(p, "nothing to train on")


def test_two_processes_follow_one_process_with_twice_the_accumulation(
    teacher_dir, corpus, tmp_path
) -> None:
    common = [
        "distill",
        "--teacher",
        str(teacher_dir),
        "--layers",
        "2",
        "--corpus",
        str(corpus),
        "--steps",
        "4",
        "--batch",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "0",
        "--final-eval-windows",
        "2",
        "--eval-seq-len",
        "32",
        "--lr",
        "1e-3",
        "--beta",
        "0.5",
    ]
    single = run(*common, "--grad-accum", "2", "-o", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "tinyllm.cli",
    ]
    double = subprocess.run(
        [*torchrun, *common, "-o", str(tmp_path / "two")], capture_output=True, text=True, env=env
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "log.json").read_text())["steps"]
    two = json.loads((tmp_path / "two" / "log.json").read_text())["steps"]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4


def test_overwrite_replaces_only_a_training_output(tmp_path):
    """--overwrite deletes OUTPUT only when it is what a distill run writes."""
    from tinyllm.distill.trainer import _prepare_output
    from tinyllm.errors import ConfigError

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ConfigError, match="not a tinyllm training output"):
        _prepare_output(foreign, resume=False, overwrite=True, rank=0, size=1)
    assert (foreign / "holiday.jpg").exists()
    ours = tmp_path / "run"
    (ours / "model").mkdir(parents=True)
    _prepare_output(ours, resume=False, overwrite=True, rank=0, size=1)
    assert not ours.exists()
