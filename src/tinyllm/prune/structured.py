"""Structured pruning that shrinks tensors: FFN channels, attention KV groups, whole blocks.

Importance is measured on calibration inputs, block by block (each block sees the previous ones
already pruned):
- FFN channel c: ||a_c||_2 * ||W_down[:, c]||_2, with a_c the channel's activation entering the
  down projection (Wanda's score at channel granularity).
- KV group g (one key/value head and the query heads that share it): the same score summed over
  the o-projection inputs of its query heads.
- Block: how much it changes its input, mean over tokens of 1 - cos(x_in, x_out) (ShortGPT's
  block influence), measured on the dense model.
With `importance="gradient"` channels and KV groups are instead scored by the first-order
Taylor estimate of the loss change when the group is removed (LLM-Pruner, Ma et al. 2023): the
sum over the group's weights (gate/up rows and down column; q/k/v rows and o columns) of
|W * dL/dW|, with L the language-model loss summed over the calibration windows, measured once
on the dense model.
Every block loses the same number of channels or groups, so the result is a standard
architecture: the config is rewritten and the model reloads and exports like any other.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tinyllm.core.calib import calibrate_blocks, observe_block
from tinyllm.core.placement import placement
from tinyllm.core.steps import Context, Step, register
from tinyllm.errors import ArchitectureError, ConfigError
from tinyllm.models.anatomy import LinearSite, find_blocks
from tinyllm.models.surgery import keep_blocks, slice_linear
from tinyllm.prune.common import by_block, prune_sites
from tinyllm.prune.owl import ColumnNorms
from tinyllm.util import dist
from tinyllm.util.progress import make_progress

FFN_IN, FFN_OUT = {"gate", "up", "fc1", "mlp_in"}, {"down", "fc2", "mlp_out"}
FFN_CONFIG_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


Importance = Literal["activation", "gradient"]


_GRADIENT_WHOLE = "importance gradient needs a backward pass through the whole model"

GRAD_BATCH = 2  # windows per backward pass of the gradient (Taylor) importance


class Channels(Step):
    calibrated = True
    ratio: float = Field(0.25, gt=0, lt=1)  # fraction of FFN channels removed in every block
    importance: Importance = "activation"

    def whole_model(self) -> str | None:
        return _GRADIENT_WHOLE if self.importance == "gradient" else None


class Heads(Step):
    calibrated = True
    ratio: float | None = Field(None, gt=0, lt=1)  # fraction of KV groups removed per block
    count: int | None = Field(None, ge=1)  # or this many groups per block
    importance: Importance = "activation"

    def whole_model(self) -> str | None:
        return _GRADIENT_WHOLE if self.importance == "gradient" else None

    @model_validator(mode="after")
    def _one(self) -> Heads:
        if (self.ratio is None) == (self.count is None):
            raise ValueError("give exactly one of ratio or count")
        return self


class Blocks(Step):
    calibrated = True
    count: int = Field(4, ge=1)  # decoder blocks removed


def _ffn(sites: list[LinearSite]) -> tuple[list[LinearSite], LinearSite]:
    ins = [s for s in sites if s.role in FFN_IN]
    outs = [s for s in sites if s.role in FFN_OUT]
    if (
        len(outs) != 1
        or not ins
        or any(s.module.out_features != outs[0].module.in_features for s in ins)
    ):
        raise ArchitectureError(
            "channel pruning needs separate FFN input projections (gate/up) and one output "
            f"projection (down); found roles {[s.role for s in sites]}"
        )
    return ins, outs[0]


def channel_scores(down: nn.Linear, act_norm: torch.Tensor) -> torch.Tensor:
    """||a_c|| * ||W_down[:, c]|| per intermediate channel. -> [intermediate]"""
    return act_norm * down.weight.detach().norm(dim=0)


def taylor_importance(model: nn.Module, windows: torch.Tensor, batch_size: int) -> None:
    """Accumulate dL/dW of the LM loss over `windows` into each block linear's `weight.grad`
    (the rest of the model is frozen for the pass). Callers read |W * grad| and clear it."""
    sites = prune_sites(model)
    wanted = {id(s.module.weight) for s in sites}
    frozen = [p for p in model.parameters() if id(p) not in wanted and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        for s in sites:
            s.module.weight.requires_grad_(True)
            s.module.weight.grad = None
        # backward keeps every block's activations and the [batch, T, vocab] logits with their
        # gradient: 8 x 512 windows at once peaked at 12 GB on smollm2-135m; 2 at a time cut that
        # batch-dependent part by 4 (the gradients accumulate, so the importance is the same)
        batches = windows.split(min(batch_size, GRAD_BATCH))
        with make_progress() as bar:
            task = bar.add_task("gradient importance", total=len(batches), info="")
            for ids in batches:
                logits = model(input_ids=ids).logits[:, :-1].float()
                loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                (loss / windows.numel()).backward()
                bar.update(task, advance=1, info=f"loss {loss.item() / ids[:, 1:].numel():.3f}")
        _reduce_grads(sites, windows.numel())
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def _reduce_grads(sites: list[LinearSite], tokens: int) -> None:
    """Under several processes, each rank's gradients are of its own loss over its `tokens`:
    -> the gradients of the loss over every rank's tokens (a no-op in a single process)."""
    if dist.world() == 1:
        return
    share = tokens / dist.sum_over_ranks(float(tokens))
    for s in sites:
        dist.all_reduce_sum(s.module.weight.grad.mul_(share))


def taylor(linear: nn.Linear) -> torch.Tensor:
    """|W * dL/dW| of a linear after `taylor_importance`. [out, in]"""
    return (linear.weight.detach() * linear.weight.grad).abs()


def _clear_grads(sites: list[LinearSite]) -> None:
    for s in sites:
        s.module.weight.grad = None


def top_sorted(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return scores.topk(keep).indices.sort().values


@register(Channels)
def prune_channels(model: nn.Module, cfg: Channels, ctx: Context) -> None:
    groups = by_block(prune_sites(model))
    width = _ffn(groups[0])[1].module.in_features
    keep = round(width * (1 - cfg.ratio))
    if keep < 1:
        raise ConfigError(f"ratio {cfg.ratio} would leave no FFN channel of {width}")
    report = ctx.report.setdefault("kept_channels", {})

    def shrink(i: int, kept: torch.Tensor) -> None:
        ins, down = _ffn(groups[i])
        for s in ins:
            slice_linear(s.module, kept, None)
        slice_linear(down.module, None, kept)
        report[i] = kept.tolist()

    if cfg.importance == "gradient":
        taylor_importance(model, ctx.calib, ctx.batch_size)
        scores = {}
        for i in groups:
            ins, down = _ffn(groups[i])
            scores[i] = taylor(down.module).sum(0) + sum(taylor(s.module).sum(1) for s in ins)
        _clear_grads([s for g in groups.values() for s in g])
        for i, score in scores.items():
            shrink(i, top_sorted(score, keep))
    else:

        def prune(i: int, block: nn.Module, xs: list, kwargs: dict):
            down = _ffn(groups[i])[1]
            norms = ColumnNorms()
            observe_block(block, xs, kwargs, [down.local], norms.add)
            shrink(i, top_sorted(channel_scores(down.module, norms.norm(down.local)), keep))

        calibrate_blocks(model, ctx.calib, ctx.batch_size, prune, "FFN channels")
    for key in FFN_CONFIG_KEYS:
        if getattr(model.config, key, None):
            setattr(model.config, key, keep)


def _attention(sites: list[LinearSite]) -> dict[str, LinearSite]:
    roles = {s.role: s for s in sites if s.role in ("q", "k", "v", "o")}
    if len(roles) != 4:
        raise ArchitectureError(
            "head pruning needs separate q, k, v and o projections; found roles "
            f"{sorted({s.role for s in sites})}"
        )
    return roles


def head_layout(model: nn.Module, q: nn.Linear, k: nn.Linear) -> tuple[int, int, int]:
    """(head_dim, query heads, KV groups) of a block."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return head_dim, q.out_features // head_dim, k.out_features // head_dim


def group_scores(o: nn.Linear, act_norm: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    """Channel scores of the o-projection inputs summed per KV group. -> [groups]"""
    per_col = act_norm * o.weight.detach().norm(dim=0)  # [heads * head_dim]
    return per_col.reshape(groups, -1).sum(-1)


@register(Heads)
def prune_heads(model: nn.Module, cfg: Heads, ctx: Context) -> None:
    groups_by_block = by_block(prune_sites(model))
    first = _attention(groups_by_block[0])
    head_dim, heads, kv = head_layout(model, first["q"].module, first["k"].module)
    drop = cfg.count if cfg.count is not None else round(cfg.ratio * kv)
    if drop < 1:
        raise ConfigError(f"ratio {cfg.ratio} of {kv} KV groups rounds to none; remove at least 1")
    if drop >= kv:
        raise ConfigError(f"cannot remove {drop} of the {kv} KV groups: at least one must stay")
    keep, rep = kv - drop, heads // kv
    report = ctx.report.setdefault("kept_kv_groups", {})

    def shrink(i: int, kept: torch.Tensor) -> None:
        att = _attention(groups_by_block[i])
        kv_rows = (kept[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        q_heads = (kept[:, None] * rep + torch.arange(rep)).reshape(-1)
        q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        slice_linear(att["q"].module, q_rows, None)
        slice_linear(att["k"].module, kv_rows, None)
        slice_linear(att["v"].module, kv_rows, None)
        slice_linear(att["o"].module, None, q_rows)
        report[i] = kept.tolist()

    if cfg.importance == "gradient":
        taylor_importance(model, ctx.calib, ctx.batch_size)
        scores = {}
        for i in groups_by_block:
            att = _attention(groups_by_block[i])
            per_group = [taylor(att[r].module).sum(1).reshape(kv, -1).sum(1) for r in "qkv"]
            scores[i] = sum(per_group) + taylor(att["o"].module).sum(0).reshape(kv, -1).sum(1)
        _clear_grads([s for g in groups_by_block.values() for s in g])
        for i, score in scores.items():
            shrink(i, top_sorted(score, keep))
    else:

        def prune(i: int, block: nn.Module, xs: list, kwargs: dict):
            o = _attention(groups_by_block[i])["o"]
            norms = ColumnNorms()
            observe_block(block, xs, kwargs, [o.local], norms.add)
            shrink(i, top_sorted(group_scores(o.module, norms.norm(o.local), head_dim, kv), keep))

        calibrate_blocks(model, ctx.calib, ctx.batch_size, prune, "KV groups")
    model.config.head_dim = head_dim
    model.config.num_attention_heads = keep * rep
    model.config.num_key_value_heads = keep


@torch.no_grad()
def block_influence(model: nn.Module, ctx: Context) -> list[float]:
    """Mean 1 - cos(x_in, x_out) of each block on the calibration windows (dense model)."""
    blocks = find_blocks(model)[1]
    influence = [0.0] * len(blocks)

    def measure(i: int, block: nn.Module, xs: list, kwargs: dict):
        from tinyllm.core.calib import Advanced, run_block

        sims = []
        for b, x in enumerate(xs):  # the outputs become the next block's inputs: one pass
            y = run_block(block, x, kwargs)
            sims.append(F.cosine_similarity(x, y, dim=-1).mean())
            xs[b] = y
        mean = torch.stack(sims).mean()
        if dist.world() > 1:  # every rank's batches are of one size: weigh each rank's mean
            mean = mean.new_tensor(dist.mean_over_ranks(float(mean), sum(len(x) for x in xs)))
        influence[i] = float(1 - mean)
        return Advanced()

    calibrate_blocks(model, ctx.calib, ctx.batch_size, measure, "block influence")
    return influence


@register(Blocks)
def prune_blocks(model: nn.Module, cfg: Blocks, ctx: Context) -> None:
    prune_sites(model)  # refuses quantized models
    n = len(find_blocks(model)[1])
    if cfg.count >= n:
        raise ConfigError(f"cannot remove {cfg.count} of the model's {n} blocks: one must stay")
    influence = block_influence(model, ctx)
    drop = set(torch.tensor(influence).topk(cfg.count, largest=False).indices.tolist())
    keep = [i for i in range(n) if i not in drop]
    placement().blocks_kept(keep)  # a streamed run renumbers the blocks it stored
    keep_blocks(model, keep)
    ctx.report["block_influence"] = influence
    ctx.report["dropped_blocks"] = sorted(drop)
