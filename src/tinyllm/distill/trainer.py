"""The distillation trainer: L = alpha * KD + beta * task + gamma * feature (+ delta * attention).

Data: every non-overlapping window of the corpus outside its evaluation slice, visited in a seeded
random order, epoch after epoch; which windows a step uses depends only on (seed, step), so a
resumed run sees exactly the data the uninterrupted run would have. Under torchrun each process
takes its share of each step's windows: N processes with accumulation A see the same windows per
step as one process with accumulation N * A.

Output directory: `model/` (the trained student, a tinyllm checkpoint), `checkpoint/` (weights,
optimizer, scheduler and RNG state, written atomically every `save_every` steps), `log.csv`,
`log.json`, `loss.png` and `summary.json`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_model, save_model
from torch import nn

from tinyllm.core.kernels import fast_linears
from tinyllm.distill import losses
from tinyllm.distill.cache import TeacherCache
from tinyllm.distill.logs import TrainLog
from tinyllm.errors import ConfigError, TinyLLMError
from tinyllm.models.anatomy import find_blocks
from tinyllm.util import dist as udist
from tinyllm.util.fs import atomic_dir, write_json_atomic
from tinyllm.util.progress import make_progress

log = logging.getLogger(__name__)

CHECKPOINT, MODEL, SUMMARY = "checkpoint", "model", "summary.json"
# Settings that change what is logged, not what is trained: free to differ on --resume.
LOG_ONLY = {"eval_every", "eval_windows", "eval_seq_len", "save_every", "final_eval_windows"}
# Settings that change how a run executes (memory, sharding), not its trajectory beyond float
# rounding: free to differ on --resume too.
HOW_ONLY = {"gradient_checkpointing", "parallel"}


class TrainingError(TinyLLMError):
    """Training cannot go on (non-finite loss, unusable checkpoint)."""


class TrainingInterrupted(TinyLLMError):
    """Ctrl-C: the run saved a checkpoint at `step` and stopped."""

    def __init__(self, step: int, directory: Path) -> None:
        super().__init__(
            f"interrupted after step {step}; checkpoint saved in {directory / CHECKPOINT}, "
            "continue with --resume"
        )
        self.step = step


class DistillConfig(BaseModel):
    """Every setting of a distillation run (the recipe stage and the CLI take the same fields)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(1.0, ge=0, le=100, description="weight of the soft-target KD loss")
    beta: float = Field(0.0, ge=0, le=100, description="weight of next-token cross-entropy")
    gamma: float = Field(0.0, ge=0, le=100, description="weight of hidden-state matching")
    delta: float = Field(0.0, ge=0, le=100, description="weight of attention-map KL")
    temperature: float = Field(1.0, gt=0, le=20)
    kd: Literal["forward", "reverse", "js"] = "forward"
    feature: Literal["mse", "cosine"] = "mse"
    layer_map: list[int] | None = None  # teacher block matched by each student block
    steps: int = Field(500, ge=1, le=10_000_000)
    lr: float = Field(1e-4, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of steps")
    weight_decay: float = Field(0.0, ge=0, le=1)
    batch: int = Field(4, ge=1, le=4096)
    seq_len: int = Field(256, ge=2, le=32768)
    grad_accum: int = Field(1, ge=1, le=4096)
    clip: float = Field(1.0, gt=0)
    seed: int = 0
    corpus: str = "enwiki"
    teacher_cache: bool = False
    topk: int = Field(64, ge=1, le=1_000_000)
    eval_every: int = Field(100, ge=0)
    eval_windows: int = Field(8, ge=1)
    eval_seq_len: int = Field(512, ge=2)
    final_eval_windows: int = Field(40, ge=1)
    save_every: int = Field(100, ge=1)
    scale_lr: float | None = Field(
        None,
        gt=0,
        le=1,
        description="peak learning rate of the quantization scales (trained as log-scales) and the "
        "1-D parameters (norms, biases); default: lr",
    )
    train: Literal["all", "scales"] = Field(
        "all",
        description="parameters that train: all, or (QAT) only the quantization scales, norms "
        "and biases, the latent weights and embeddings frozen (EfficientQAT's end-to-end stage)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each block's activations in the backward pass instead of keeping "
        "them: less memory, about a third more time",
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="under torchrun: ddp keeps a whole student on every process, fsdp shards its "
        "parameters, gradients and optimizer state over the processes; auto: fsdp on GPUs the "
        "student's training state does not fit, else ddp",
    )

    @model_validator(mode="after")
    def _weights(self) -> DistillConfig:
        if self.alpha + self.beta + self.gamma + self.delta == 0:
            raise ValueError("alpha, beta, gamma and delta are all 0: nothing to train on")
        return self

    def trajectory(self) -> dict:
        """The settings that decide the training trajectory."""
        return {k: v for k, v in self.model_dump().items() if k not in LOG_ONLY | HOW_ONLY}


@dataclass
class Run:
    """What the trainer needs besides the config."""

    teacher: nn.Module
    student: nn.Module
    tokenizer: object
    grid: torch.Tensor  # [windows, T] token ids of the training split
    out: Path
    identity: dict  # teacher/student specs etc.; must match on --resume
    # Objects with optional after_backward(trainer) / after_step(trainer) and, to survive
    # --resume, state_dict() / load_state_dict(d): fixed masks of a pruned student, movement
    # pruning's scores.
    hooks: list = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where it trains


# ---------------------------------------------------------------- distributed helpers


def world() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (util.dist)."""
    size = udist.init_from_env()
    return udist.rank(), size


def _mean_across(values: torch.Tensor, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(values)
        values /= size
    return values


def _barrier(size: int) -> None:
    if size > 1:
        dist.barrier()


# ---------------------------------------------------------------- data order


class Order:
    """Grid rows for each (step, micro-batch, rank): a seeded permutation per epoch."""

    def __init__(self, windows: int, seed: int) -> None:
        self.windows, self.seed, self._epoch, self._perm = windows, seed, -1, None

    def _row(self, i: int) -> int:
        epoch, pos = divmod(i, self.windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.windows, generator=gen), epoch
        return int(self._perm[pos])

    def rows(self, step: int, micro: int, rank: int, cfg: DistillConfig, size: int) -> torch.Tensor:
        per_step = cfg.batch * cfg.grad_accum * size
        first = step * per_step + (micro * size + rank) * cfg.batch
        return torch.tensor([self._row(i) for i in range(first, first + cfg.batch)])


# ---------------------------------------------------------------- the student side


class BlockTap:
    """Forward hooks that keep the output hidden state of chosen decoder blocks."""

    def __init__(self, model: nn.Module, indices: list[int]) -> None:
        _, blocks = find_blocks(model)
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = [
            blocks[i].register_forward_hook(self._keep(i)) for i in sorted(set(indices))
        ]

    def _keep(self, i: int):
        def hook(_mod, _inp, out):
            self.outputs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class Pair(nn.Module):
    """The student plus the projectors that map its hidden states to the teacher's width; the
    one module the optimizer (and DistributedDataParallel) sees."""

    def __init__(self, student: nn.Module, teacher_width: int, mapped: int) -> None:
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        self.projectors = nn.ModuleList(
            [nn.Linear(width, teacher_width, bias=False) for _ in range(mapped)]
            if width != teacher_width
            else []
        )
        self.tap = BlockTap(student, list(range(mapped))) if mapped else None

    def forward(self, ids: torch.Tensor, attentions: bool) -> tuple:
        out = self.student(input_ids=ids, use_cache=False, output_attentions=attentions)
        hidden = []
        if self.tap is not None:
            hidden = [self.tap.outputs[i] for i in range(len(self.tap.handles))]
            if len(self.projectors):
                hidden = [p(h) for p, h in zip(self.projectors, hidden, strict=True)]
        return out.logits, hidden, out.attentions if attentions else None


def _teacher_map(cfg: DistillConfig, student_layers: int, teacher_layers: int) -> list[int]:
    mapping = cfg.layer_map or losses.layer_map(student_layers, teacher_layers)
    if len(mapping) != student_layers or not all(0 <= j < teacher_layers for j in mapping):
        raise ConfigError(
            f"layer_map needs {student_layers} teacher block indices in 0..{teacher_layers - 1}, "
            f"got {mapping}"
        )
    return mapping


# ---------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, run: Run, cfg: DistillConfig) -> None:
        self.run, self.cfg = run, cfg
        self.rank, self.size = world()
        s_layers = len(find_blocks(run.student)[1])
        t_layers = len(find_blocks(run.teacher)[1])
        self.features = cfg.gamma > 0
        self.tmap = _teacher_map(cfg, s_layers, t_layers) if self.features else []
        self.amap = _teacher_map(cfg, s_layers, t_layers) if cfg.delta > 0 else []
        self.t_tap = BlockTap(run.teacher, self.tmap) if self.features else None
        if cfg.delta > 0:
            heads = [m.config.num_attention_heads for m in (run.student, run.teacher)]
            if heads[0] != heads[1]:
                raise ConfigError(
                    f"attention-map KL (delta) needs equal head counts: the student has "
                    f"{heads[0]} heads, the teacher {heads[1]}; set delta to 0"
                )
            for m in (run.student, run.teacher):
                m.set_attn_implementation("eager")  # attention maps need the eager kernel
        self.device = udist.rank_device(run.device)
        self.mode = self._mode()
        # FSDP trains a sharded copy; taken before the Pair's hooks are on the student
        sharded = copy.deepcopy(run.student) if self.mode == "fsdp" else None
        self.pair = Pair(run.student, run.teacher.config.hidden_size, len(self.tmap))
        self.trained = self._place(sharded)  # the Pair whose parameters the optimizer moves
        self.model: nn.Module = self.trained
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.trained, device_ids=ids)
        self.opt = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.order = Order(run.grid.shape[0], cfg.seed)
        self.cache = self._cache()
        self.log = TrainLog()
        self.step = self._last_saved = 0
        self._stop = False

    def _mode(self) -> str:
        """single (one process), ddp or fsdp: `parallel`, with auto resolved by device memory."""
        if self.size == 1:
            return "single"
        if self.cfg.parallel != "auto":
            return self.cfg.parallel
        if self.device.type != "cuda":
            return "ddp"
        need = training_bytes(self.run.student, self.run.teacher)
        have = torch.cuda.get_device_properties(self.device).total_memory
        log.info("training state %.1f GiB, device %.1f GiB", need / 2**30, have / 2**30)
        return "fsdp" if need > 0.8 * have else "ddp"

    def _place(self, sharded: nn.Module | None) -> Pair:
        """Models and hooks onto this rank's device; under FSDP the sharded training Pair, built
        on the copy `sharded` of the student with the same projector weights."""
        run = self.run
        if self.cfg.gradient_checkpointing:
            checkpointing(sharded if sharded is not None else run.student, True)
        run.teacher.to(self.device)
        for hook in run.hooks:
            if hasattr(hook, "to"):
                hook.to(self.device)
        if sharded is None:
            return self.pair.to(self.device)
        if run.hooks:
            raise ConfigError(
                "parallel: fsdp cannot keep a pruned student's masks or movement scores (they "
                "address whole weights); use parallel: ddp"
            )
        with torch.random.fork_rng(devices=[]):
            pair = Pair(sharded, run.teacher.config.hidden_size, len(self.tmap))
        pair.projectors.load_state_dict(self.pair.projectors.state_dict())
        return shard_pair(pair, self.device, self.size)

    def _param_groups(self) -> list[dict]:
        """Trainable parameters; with scale_lr, the quantization scales and 1-D parameters (norms,
        biases) form a second group at that learning rate."""
        from tinyllm.distill.student import scale_like

        named = [(n, p) for n, p in self.trained.named_parameters() if p.requires_grad]
        if self.cfg.scale_lr is None:  # one group, in module order (as checkpoints store it)
            return [{"params": [p for _, p in named]}]
        rest = [p for n, p in named if not scale_like(n, p)]
        scales = [p for n, p in named if scale_like(n, p)]
        return [{"params": rest}, {"params": scales, "lr": self.cfg.scale_lr}]

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to min_lr_ratio."""
        cfg = self.cfg
        warm = int(cfg.warmup * cfg.steps)
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, cfg.steps - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _cache(self) -> TeacherCache | None:
        cfg = self.cfg
        if not cfg.teacher_cache:
            return None
        if self.features or cfg.delta > 0:
            log.warning("teacher cache off: feature and attention losses need the live teacher")
            return None
        if cfg.kd != "forward" or cfg.alpha == 0:
            log.warning("teacher cache off: top-k logits serve forward KD only")
            return None
        cache = None
        if self.rank == 0:
            cache = TeacherCache.for_run(self.run.teacher, self.run.grid, cfg.topk)
        _barrier(self.size)
        return cache or TeacherCache.for_run(self.run.teacher, self.run.grid, cfg.topk)

    # -- one step

    def _terms(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (bf16 autocast on CUDA)."""
        with torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda"):
            return self._terms_of(rows)

    def _terms_of(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        ids = self.run.grid[rows].to(self.device)  # [B, T]
        want_attn = cfg.delta > 0
        logits, hidden, attn = self.model(ids, want_attn)
        logits = logits[:, :-1]  # predicts ids[:, 1:]
        terms: dict[str, torch.Tensor] = {}
        if cfg.beta > 0:
            terms["task"] = losses.task_loss(logits, ids[:, 1:])
        if self.cache is not None:
            values, idx, rest = (
                t.to(self.device) for t in self.cache.get(rows, self._teacher_logits)
            )
            terms["kd"] = losses.kd_loss_topk(
                logits, values[:, :-1], idx[:, :-1], cfg.temperature, rest[:, :-1]
            )
            return terms
        need_teacher = cfg.alpha > 0 or self.features or want_attn
        if not need_teacher:
            return terms
        with torch.no_grad():
            t_out = self.run.teacher(input_ids=ids, use_cache=False, output_attentions=want_attn)
        if cfg.alpha > 0:
            terms["kd"] = losses.kd_loss(logits, t_out.logits[:, :-1], cfg.temperature, cfg.kd)
        if self.features:
            pairs = zip(hidden, self.tmap, strict=True)
            terms["feature"] = torch.stack(
                [losses.feature_loss(h, self.t_tap.outputs[j], cfg.feature) for h, j in pairs]
            ).mean()
        if want_attn:
            terms["attention"] = torch.stack(
                [
                    losses.attention_kl(a, t_out.attentions[j])
                    for a, j in zip(attn, self.amap, strict=True)
                ]
            ).mean()
        return terms

    @torch.no_grad()
    def _teacher_logits(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.run.grid[rows].to(self.device)
        return self.run.teacher(input_ids=ids, use_cache=False).logits

    def _train_step(self) -> dict:
        cfg = self.cfg
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            rows = self.order.rows(self.step, micro, self.rank, cfg, self.size)
            sync = micro == cfg.grad_accum - 1 or self.size == 1
            with self._sync(sync):
                terms = self._terms(rows)
                loss = losses.combine(terms, cfg.alpha, cfg.beta, cfg.gamma, cfg.delta)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        keys = list(sums)
        means = _mean_across(torch.tensor([sums[k] for k in keys], dtype=torch.float64), self.size)
        row = dict(zip(keys, means.tolist(), strict=True))
        if not math.isfinite(row["loss"]):
            self.opt.zero_grad(set_to_none=True)
            raise TrainingError(
                f"the loss became {row['loss']} at step {self.step + 1}; training stopped and the "
                f"last good checkpoint (step {self._last_saved}) is kept in "
                f"{self.run.out / CHECKPOINT}. Lower --lr or --temperature and --resume."
            )
        self._call("after_backward")
        params = [p for p in self.trained.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        row["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        row["lr"] = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._call("after_step")
        return row

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient synchronisation on (the last micro-batch) or off (accumulating)."""
        if sync or self.mode == "single":
            if self.mode == "fsdp":
                self.trained.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.mode == "fsdp":
            self.trained.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _call(self, event: str) -> None:
        for hook in self.run.hooks:
            fn = getattr(hook, event, None)
            if fn is not None:
                fn(self)

    # -- checkpoints

    def save(self) -> None:
        """Everything a resumed run needs, atomically, by rank 0."""
        self.sync_back()
        optimizer = self._optimizer_state()
        if self.rank == 0:
            with atomic_dir(self.run.out / CHECKPOINT) as tmp:
                save_model(self.pair, str(tmp / "trainable.safetensors"))
                state = {
                    "optimizer": optimizer,
                    "scheduler": self.sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "hooks": [h.state_dict() for h in self.run.hooks if hasattr(h, "state_dict")],
                }
                torch.save(state, tmp / "trainer.pt")
                info = {"step": self.step, "config": self.cfg.trajectory(), **self.run.identity}
                (tmp / "state.json").write_text(json.dumps(info, indent=2) + "\n")
            self.log.write(self.run.out)
        self._last_saved = self.step
        _barrier(self.size)

    def load(self) -> None:
        """Continue from `out/checkpoint`: refuse a changed config, say what is corrupted."""
        ckpt = self.run.out / CHECKPOINT
        try:
            info = json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise TrainingError(
                f"cannot resume: {ckpt / 'state.json'} is unreadable ({exc}); delete {ckpt} to "
                "start over"
            ) from exc
        _check_same(info, {"config": self.cfg.trajectory(), **self.run.identity})
        try:
            load_model(self.pair, str(ckpt / "trainable.safetensors"))  # strict: all keys
            state = torch.load(ckpt / "trainer.pt", weights_only=True)
            self._load_optimizer(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            stateful = [h for h in self.run.hooks if hasattr(h, "load_state_dict")]
            for hook, saved in zip(stateful, state["hooks"], strict=True):
                hook.load_state_dict(saved)
        except Exception as exc:  # safetensors / torch raise many types on damaged files
            raise TrainingError(
                f"cannot resume: the checkpoint in {ckpt} is corrupted ({type(exc).__name__}: "
                f"{str(exc)[:200]}); delete it to start over"
            ) from exc
        self.step = self._last_saved = int(info["step"])
        self.log = TrainLog.read(self.run.out, self.step)

    def _optimizer_state(self) -> dict:
        """The optimizer's state (under FSDP gathered whole, on rank 0; all ranks call this)."""
        if self.mode != "fsdp":
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict as get

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get(self.trained, self.opt, options=options)

    def _load_optimizer(self, state: dict) -> None:
        """Resume the optimizer; under FSDP first the sharded weights from the whole Pair."""
        if self.mode != "fsdp":
            self.opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint import state_dict as sd

        options = sd.StateDictOptions(full_state_dict=True)
        sd.set_model_state_dict(self.trained, self.pair.state_dict(), options=options)
        sd.set_optimizer_state_dict(self.trained, self.opt, state, options=options)

    def sync_back(self) -> None:
        """Under FSDP, gather the trained shards into the whole Pair on rank 0 (all ranks call
        this); elsewhere the Pair is what trains, and nothing is to do."""
        if self.mode != "fsdp":
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        whole = get_model_state_dict(self.trained, options=options)
        if self.rank == 0:
            self.pair.load_state_dict(whole)

    def finish(self) -> None:
        """After training: the trained weights in the student, everything back in CPU memory
        (where compress packs and saves), gradient checkpointing off."""
        self.sync_back()
        if self.cfg.gradient_checkpointing:
            checkpointing(self.run.student, False)
        cpu = torch.device("cpu")
        self.pair.to(cpu)
        self.run.teacher.to(cpu)
        for hook in self.run.hooks:
            if hasattr(hook, "to"):
                hook.to(cpu)

    # -- evaluation

    def evaluate(self, windows: int) -> dict:
        from tinyllm.eval.evaluate import evaluate

        r = evaluate(
            self.run.student,
            self.run.tokenizer,
            corpus=self.cfg.corpus,
            seq_len=self.cfg.eval_seq_len,
            windows=windows,
            reference=(self.run.teacher, self.run.tokenizer),
        )
        self.run.student.train()
        self.run.teacher.to(self.device)  # evaluate moved it to the student (FSDP: the CPU)
        return {"perplexity": r.perplexity, "kld": r.kld, "top1_agreement": r.top1_agreement}

    # -- the loop

    def fit(self, resume: bool) -> dict:
        """Train from step 0 (or the checkpoint) to cfg.steps. -> throughput facts"""
        cfg = self.cfg
        if resume:
            self.load()
        self.run.teacher.to(self.device)  # an evaluation before may have moved it
        self.trained.train()  # the student (under FSDP its sharded copy) and the projectors
        tokens_per_step = cfg.batch * cfg.grad_accum * self.size * self.run.grid.shape[1]
        train_seconds, done = 0.0, 0
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            # the frozen teacher runs on pre-packed oneDNN linears (core.kernels) throughout
            micro_tokens = cfg.batch * self.run.grid.shape[1]
            with fast_linears(self.run.teacher, micro_tokens), make_progress() as bar:
                task = bar.add_task("distilling", total=cfg.steps, completed=self.step, info="")
                while self.step < cfg.steps:
                    t0 = time.perf_counter()
                    row = self._train_step()
                    train_seconds += time.perf_counter() - t0
                    done += 1
                    self.step += 1
                    tps = tokens_per_step * done / train_seconds
                    self.log.steps.append({"step": self.step, **row, "tokens_per_s": tps})
                    bar.update(task, completed=self.step, info=_bar_info(row, tps))
                    self._periodic()
                    if self._stopping():
                        self.save()
                        raise TrainingInterrupted(self.step, self.run.out)
        finally:
            signal.signal(signal.SIGINT, previous)
        if self._last_saved != self.step:
            self.save()
        return {
            "train_seconds": train_seconds,
            "tokens_per_second": _rate(tokens_per_step, done, train_seconds),
        }

    def _periodic(self) -> None:
        cfg = self.cfg
        if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
            self.sync_back()
            if self.rank == 0:
                self.log.evals.append({"step": self.step, **self.evaluate(cfg.eval_windows)})
            _barrier(self.size)
        if self.step % cfg.save_every == 0:
            self.save()

    def _on_sigint(self, _sig, _frame) -> None:
        if self._stop:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop = True
        log.warning("Ctrl-C: finishing this step, saving a checkpoint, then stopping")

    def _stopping(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        return bool(_mean_across(flag, self.size) > 0)


def checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing of a Hugging Face model's blocks on or off (non-reentrant, which
    DDP and FSDP support)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        enable, disable = (
            model.activation_checkpointing_enable,
            model.activation_checkpointing_disable,
        )
        args = {"activation_checkpointing_kwargs": kwargs}
    elif hasattr(model, "gradient_checkpointing_enable"):
        enable, disable = model.gradient_checkpointing_enable, model.gradient_checkpointing_disable
        args = {"gradient_checkpointing_kwargs": kwargs}
    else:
        raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
    if on:
        enable(**args)
    else:
        disable()


def training_bytes(student: nn.Module, teacher: nn.Module) -> int:
    """Device memory of a training step's states, activations aside: the student's fp32
    weights, gradients and two AdamW moments (16 bytes a parameter) plus the teacher's weights."""
    s = sum(p.numel() for p in student.parameters())
    return 16 * s + sum(p.numel() * p.element_size() for p in teacher.parameters())


def shard_pair(pair: Pair, device: torch.device, size: int) -> Pair:
    """FSDP (fully_shard) over `size` processes: each decoder block of the student its own unit,
    the rest (embeddings, head, norms, projectors) the root's; the shards on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (size,))
    for block in find_blocks(pair.student)[1]:
        fully_shard(block, mesh=mesh)
    fully_shard(pair, mesh=mesh)
    return pair


def _rate(tokens_per_step: int, steps: int, seconds: float) -> float | None:
    return tokens_per_step * steps / seconds if seconds > 0 else None


def _bar_info(row: dict, tps: float) -> str:
    terms = " ".join(
        f"{k} {row[k]:.3f}" for k in ("loss", "kd", "task", "feature", "attention") if k in row
    )
    return f"{terms} | {tps:.0f} tok/s"


def _check_same(saved: dict, current: dict) -> None:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key == "step":
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(
            "cannot resume: this run's settings differ from the checkpoint's ("
            + "; ".join(diffs)
            + "); use the same settings, or a new output directory"
        )


def _eval_final(
    run: Run, cfg: DistillConfig, model: nn.Module, reference: bool, memo: bool = False
) -> dict:
    """The default-protocol evaluation of `model` (against the teacher if `reference`). With
    `memo`, a result for the same weights, teacher and windows is read from the cache: repeated
    runs from one student do not re-measure their starting point."""
    from tinyllm.data.corpora import load_corpus
    from tinyllm.distill.cache import model_fingerprint
    from tinyllm.eval.evaluate import evaluate
    from tinyllm.util.fs import cache_dir

    ref = (run.teacher, run.tokenizer) if reference else None
    path = None
    if memo:
        parts = [model_fingerprint(model), model_fingerprint(run.teacher) if reference else "-"]
        parts += [
            load_corpus(cfg.corpus).digest,
            str(cfg.eval_seq_len),
            str(cfg.final_eval_windows),
        ]
        path = cache_dir("evals") / ("-".join(parts) + ".json")
        if path.is_file():
            return json.loads(path.read_text())
    r = evaluate(
        model,
        run.tokenizer,
        corpus=cfg.corpus,
        seq_len=cfg.eval_seq_len,
        windows=cfg.final_eval_windows,
        reference=ref,
    )
    result = {"perplexity": r.perplexity, "kld": r.kld, "top1_agreement": r.top1_agreement}
    result["sparsity"] = r.sparsity
    if path is not None:
        write_json_atomic(path, result)
    return result


def recovery(teacher_ppl: float, before_ppl: float, after_ppl: float) -> float:
    """1 - gap_after / gap_before with gap = ln(ppl_student) - ln(ppl_teacher)."""
    gap_before = math.log(before_ppl) - math.log(teacher_ppl)
    gap_after = math.log(after_ppl) - math.log(teacher_ppl)
    return 1 - gap_after / gap_before if gap_before else float("nan")


def distill(
    run: Run,
    cfg: DistillConfig,
    resume: bool = False,
    save_meta: dict | None = None,
    save: bool = True,
) -> dict:
    """The whole run: baseline evaluation, training, packing, final evaluation, outputs.

    `run.student` must come from `student.prepare_for_training`. `save=False` leaves writing the
    trained model to the caller (`core.compress`). -> summary dict
    """
    from tinyllm.checkpoint import round_floats, save_checkpoint
    from tinyllm.distill.student import finish_training
    from tinyllm.util.memory import peak_rss_bytes

    out = run.out
    trainer = Trainer(run, cfg)
    summary_path = out / SUMMARY
    if resume and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        summary = {"config": cfg.model_dump(), **run.identity}
        if trainer.rank == 0:
            summary["teacher_eval"] = _eval_final(run, cfg, run.teacher, False, memo=True)
            summary["before"] = _eval_final(run, cfg, run.student, True, memo=True)
            write_json_atomic(summary_path, summary)
        _barrier(trainer.size)
    speed = trainer.fit(resume)
    trainer.finish()
    if trainer.rank != 0:
        return summary
    finish_training(run.student)
    round_floats(run.student, torch.float16)
    summary["after"] = _eval_final(run, cfg, run.student, reference=True)
    summary["recovery"] = recovery(
        summary["teacher_eval"]["perplexity"],
        summary["before"]["perplexity"],
        summary["after"]["perplexity"],
    )
    summary.update(speed, peak_rss_bytes=peak_rss_bytes(), world_size=trainer.size)
    meta = {
        **(save_meta or {}),
        "distill": {k: summary[k] for k in ("before", "after", "recovery")},
    }
    if save:
        save_checkpoint(run.student, run.tokenizer, out / MODEL, meta, overwrite=True)
    write_json_atomic(summary_path, summary)
    return summary


def _is_training_output(out: Path) -> bool:
    """What a distill run writes: its training checkpoint, its model, or its summary."""
    return out.is_dir() and any((out / name).exists() for name in (CHECKPOINT, MODEL, SUMMARY))


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Check or clear a training output directory (rank 0 clears, every rank waits)."""
    _prepare_output(Path(out), resume, overwrite, *world())


def _prepare_output(out: Path, resume: bool, overwrite: bool, rank: int, size: int) -> None:
    import shutil

    busy = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if resume and not (out / CHECKPOINT).is_dir():
        raise ConfigError(f"--resume: {out} holds no training checkpoint to continue from")
    if busy and not resume and not overwrite:
        raise ConfigError(
            f"output {out} exists and is not empty; pass --resume to continue its run or "
            "--overwrite to start over"
        )
    if busy and overwrite and not resume and not _is_training_output(out):
        raise ConfigError(
            f"--overwrite refused: {out} is not empty and is not a tinyllm training output (no "
            f"{CHECKPOINT}/, {MODEL}/ or {SUMMARY}), so replacing it would delete files tinyllm "
            "did not write; delete or move it yourself, or choose another output"
        )
    if busy and overwrite and not resume and rank == 0:
        shutil.rmtree(out)
    _barrier(size)


def make_run(
    teacher_spec: str,
    student_spec: str | None,
    layers: int | None,
    cfg: DistillConfig,
    out: Path,
    resume: bool = False,
    overwrite: bool = False,
    prepare: Callable[[nn.Module], None] | None = None,
) -> tuple[Run, dict]:
    """Load the teacher, build or load the student (then `prepare(student)`, e.g. a pruning
    round), cut the training windows. -> (run, meta)"""
    from tinyllm.checkpoint import prior_steps
    from tinyllm.core.load import load
    from tinyllm.distill.student import check_pair, layer_dropped

    if student_spec is None and layers is None:
        raise ConfigError("give a student: --student MODEL, or --layers N for a layer-dropped copy")
    out = Path(out)
    _prepare_output(out, resume, overwrite, *world())
    teacher, tok = load(teacher_spec)
    if student_spec is not None:
        student, s_tok = load(student_spec)
        check_pair(teacher, tok, student, s_tok)
        if layers is not None:
            student = layer_dropped(student, layers)
    else:
        student = layer_dropped(teacher, layers)
    if prepare is not None:
        prepare(student)
    identity = {"teacher": teacher_spec, "student": student_spec or teacher_spec, "layers": layers}
    run = build_run(teacher, tok, student, cfg, out, identity)
    meta = {
        "source": student_spec or teacher_spec,
        "teacher": teacher_spec,
        "steps": [*prior_steps(student_spec or ""), {"type": "distill", **cfg.model_dump()}],
    }
    return run, meta


def build_run(
    teacher: nn.Module,
    tokenizer: object,
    student: nn.Module,
    cfg: DistillConfig,
    out: Path,
    identity: dict,
    device: torch.device | None = None,
) -> Run:
    """A run of loaded models: the teacher frozen, the student made trainable (fake quant for
    quantized layers, fixed masks for pruned ones), the training windows cut. It trains on
    `device` (default cpu; under torchrun a plain cuda is each process's own GPU)."""
    from tinyllm.data.corpora import load_corpus
    from tinyllm.data.windows import tokenize_corpus, train_windows, with_bos
    from tinyllm.distill.student import prepare_for_training

    for p in teacher.parameters():
        p.requires_grad_(False)
    _, masks = prepare_for_training(student, cfg.train)
    text = load_corpus(cfg.corpus)
    grid = with_bos(
        train_windows(tokenize_corpus(text, tokenizer), cfg.seq_len, text.name), tokenizer
    )
    identity = {**identity, "global_batch": cfg.batch * cfg.grad_accum * world()[1]}
    hooks = [masks] if len(masks) else []
    run = Run(teacher.eval(), student, tokenizer, grid, Path(out), identity, hooks)
    run.device = device or torch.device("cpu")
    return run
