"""The trainer over two CPU processes (gloo), DDP and FSDP: every rank ends with the same student,
and the losses and weights follow one process trained on the same global batch. Gradient
checkpointing changes memory, not the numbers. The same on GPUs is marked `gpu`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tinyllm.distill import trainer as tr
from tinyllm.util import dist

WORLD = 2
SMALL = dict(steps=3, batch=2, seq_len=32, lr=1e-3, beta=0.5, eval_every=0, save_every=100)


def _train(teacher: Path, corpus: Path, out: Path, device: str = "cpu", **kw) -> dict:
    """A few steps of distillation (no evaluations): the loss log and the trained weights."""
    cfg = tr.DistillConfig(**{**SMALL, "corpus": str(corpus), **kw})
    run, _ = tr.make_run(str(teacher), None, 2, cfg, out)
    run.device = torch.device(device)
    trainer = tr.Trainer(run, cfg)
    modules = trainer.trained.student.modules()
    checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in modules)
    trainer.fit(resume=False)
    trainer.finish()
    weights = {k: v.detach().clone() for k, v in trainer.pair.state_dict().items()}
    losses = [row["loss"] for row in trainer.log.steps]
    return {"losses": losses, "weights": weights, "mode": trainer.mode, "ckpt": checkpointed}


def _interrupted_then_resumed(teacher: Path, corpus: Path, out: Path, **kw) -> dict:
    """_train stopped (and checkpointed) after step 2, then resumed to the end."""
    cfg = tr.DistillConfig(**{**SMALL, "corpus": str(corpus), **kw})
    run, _ = tr.make_run(str(teacher), None, 2, cfg, out)
    first = tr.Trainer(run, cfg)
    first._stopping = lambda: first.step == 2
    with pytest.raises(tr.TrainingInterrupted):
        first.fit(resume=False)
    run, _ = tr.make_run(str(teacher), None, 2, cfg, out, resume=True)
    trainer = tr.Trainer(run, cfg)
    trainer.fit(resume=True)
    trainer.finish()
    weights = {k: v.detach().clone() for k, v in trainer.pair.state_dict().items()}
    return {"losses": [row["loss"] for row in trainer.log.steps], "weights": weights}


def _worker(rank: int, teacher: str, corpus: str, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    try:
        result = {}
        for mode in ("ddp", "fsdp"):
            where = Path(out) / mode
            result[mode] = _train(Path(teacher), Path(corpus), where, parallel=mode)
        where = Path(out) / "fsdp-resumed"
        result["fsdp-resumed"] = _interrupted_then_resumed(
            Path(teacher), Path(corpus), where, parallel="fsdp"
        )
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        if dist.initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    from transformers import AutoModelForCausalLM

    from tests.conftest import TEXT, tiny_config, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("ddp")
    tok = tiny_tokenizer()
    cfg = tiny_config("llama", vocab=len(tok))
    cfg.num_hidden_layers, cfg.initializer_range = 4, 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "teacher")
    tok.save_pretrained(tmp / "teacher")
    (tmp / "train.txt").write_text(TEXT * 8, encoding="utf-8")
    os.environ.setdefault("TINYLLM_CACHE", str(tmp / "cache"))
    return tmp / "teacher", tmp / "train.txt", tmp


@pytest.fixture(scope="module")
def runs(setup) -> tuple[dict, list[dict]]:
    """(one process with accumulation 2, each of two processes' results for ddp and fsdp)"""
    teacher, corpus, tmp = setup
    args = (str(teacher), str(corpus), _free_port(), str(tmp))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)
    return _train(teacher, corpus, tmp / "one", grad_accum=2), ranks


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_ddp_ranks_end_identical_and_follow_one_process(runs) -> None:
    """Same global batch (2 processes x 2 windows = 1 process x 2 windows x 2 accumulations):
    losses within 1e-4 relative, weights within 1e-4 after 3 steps at lr 1e-3."""
    one, ranks = runs
    assert [r["ddp"]["mode"] for r in ranks] == ["ddp", "ddp"] and one["mode"] == "single"
    a, b = ranks[0]["ddp"]["weights"], ranks[1]["ddp"]["weights"]
    assert all(torch.equal(a[k], b[k]) for k in a), "DDP ranks differ"
    assert ranks[0]["ddp"]["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert _max_diff(a, one["weights"]) < 1e-4
    assert one["losses"][0] != one["losses"][-1]  # it trained


def test_fsdp_on_cpu_follows_ddp(runs) -> None:
    """FSDP (fully_shard over gloo): the gathered student on rank 0 and the losses match DDP's
    to float rounding (the sharded reductions sum in another order)."""
    _, ranks = runs
    fsdp, ddp = ranks[0]["fsdp"], ranks[0]["ddp"]
    assert fsdp["mode"] == "fsdp"
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-4)
    assert _max_diff(fsdp["weights"], ddp["weights"]) < 1e-4


def test_fsdp_interrupted_and_resumed_follows_the_uninterrupted_run(runs) -> None:
    """The FSDP checkpoint (the whole student, the gathered optimizer state) resumes: the same
    losses and, on rank 0, the same weights as the uninterrupted FSDP run."""
    _, ranks = runs
    resumed, whole = ranks[0]["fsdp-resumed"], ranks[0]["fsdp"]
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    assert _max_diff(resumed["weights"], whole["weights"]) < 1e-6


def test_gradient_checkpointing_keeps_the_numbers(setup) -> None:
    teacher, corpus, tmp = setup
    plain = _train(teacher, corpus, tmp / "plain", steps=2)
    ckpt = _train(teacher, corpus, tmp / "ckpt", steps=2, gradient_checkpointing=True)
    assert ckpt["ckpt"] and not plain["ckpt"]
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert _max_diff(ckpt["weights"], plain["weights"]) < 1e-6


def test_how_it_runs_may_change_on_resume() -> None:
    cfg = tr.DistillConfig()
    assert "parallel" not in cfg.trajectory() and "gradient_checkpointing" not in cfg.trajectory()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_in_bf16_follows_the_cpu(setup) -> None:
    """On CUDA the student, teacher and batches are on the GPU under bf16 autocast: the losses
    follow the fp32 CPU run to bf16 precision, and the student comes back to CPU memory."""
    teacher, corpus, tmp = setup
    cpu = _train(teacher, corpus, tmp / "cpu", steps=2)
    gpu = _train(teacher, corpus, tmp / "gpu", device="cuda", steps=2)
    assert gpu["losses"] == pytest.approx(cpu["losses"], rel=3e-2)
    assert all(v.device.type == "cpu" for v in gpu["weights"].values())
