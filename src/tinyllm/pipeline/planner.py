"""`plan`: search quantization recipes against a budget instead of guessing.

1. Sensitivity: for every block linear, the KL divergence to the original when only that layer is
   quantized with a probe grid (RTN 3-bit, groups of 128), on calibration windows (never the
   evaluation slice).
2. Prediction: a candidate grid c costs sum_l sens_l * e_l(c) / e_l(probe), with e_l the layer's
   weight quantization error ||W - Q(W)||^2 under RTN (second-order view: each layer's KL
   contribution grows with its squared weight error). Its size on disk is computed exactly from the
   shapes (packed codes, float16 scales, uint8 zero points, float16 for everything else).
3. Verification: the best few candidates that fit the budget are quantized for real (GPTQ) and
   scored by the evaluation harness; the recommendation is the best verified one by the
   objective: measured KLD (default), perplexity, or a task's accuracy (`task:NAME`, scored by
   `eval.tasks` on each verified candidate and the original; ties go to the lower KLD).

Candidates are uniform grids for the block linears, each with the embedding table (and head) in
float16 or quantized to 8 or 4 bits (measured directly: two extra forwards), plus mixed-precision
candidates: for each group size and symmetry, the per-layer widths (2, 3, 4, 5 or 8 bits) that
minimise the predicted KL with the model exactly at the size budget (the multiple-choice knapsack
of quant/mixed.py over the same per-layer predictions); verified as GPTQ with those widths, and
written to the recipe as a `mixed` stage that replays the allocation. With them come GGUF type
mixes: a llama.cpp type per block linear (quant/mixed.py DEFAULT_TYPES: Q2_K..Q6_K where rows
are whole 256s, Q4_0, Q5_0, Q8_0), predicted the same way from each type's RTN error, their block
linears sized in GGUF bytes (what the exported file holds), verified as GPTQ on each layer's
type grid and written as a `mixed` stage over types with a `--type auto` GGUF export.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tinyllm.errors import ConfigError
from tinyllm.models.anatomy import analyze
from tinyllm.quant.embed import embed_step
from tinyllm.quant.rtn import RTN, rtn_quantize
from tinyllm.util.progress import track

log = logging.getLogger(__name__)

PROBE = RTN(bits=3, group_size=128)  # per output channel where 128 does not divide the inputs
BITS = (2, 3, 4, 5, 8)
GROUPS = (32, 64, 128, -1)
EMBED_BITS = (None, 8, 4)  # embedding table options (Embeddings step: RTN sym g32)
MIXED_BITS = (2, 3, 4, 5, 8)  # widths a mixed-precision candidate may give a layer


@dataclass(frozen=True)
class Grid:
    bits: int
    group_size: int
    sym: bool

    @property
    def label(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return f"{self.bits}b-{g}-{'sym' if self.sym else 'asym'}"


@dataclass
class Candidate:
    grid: Grid
    size_bytes: int
    predicted_kld: float
    measured: dict[str, Any] | None = None  # evaluation of the real GPTQ model
    embed_bits: int | None = None  # embeddings (and head) quantized too; None: float16
    # mixed precision: width (or GGUF type name) per block linear
    layer_bits: dict[str, int | str] | None = None
    avg_bits: float | None = None  # mixed precision: parameter-weighted mean width (GGUF bpw)

    @property
    def gguf_mix(self) -> bool:
        """A GGUF type per layer (the grid is only GPTQ's other settings)."""
        return bool(self.layer_bits) and isinstance(next(iter(self.layer_bits.values())), str)

    @property
    def label(self) -> str:
        grid = self.grid.label
        if self.gguf_mix:
            emb = f" + emb{self.embed_bits}" if self.embed_bits else ""
            return f"GGUF mix {self.avg_bits:.2f} bpw{emb}"
        if self.layer_bits is not None:  # the grid's bits are not used: say the mean width
            grid = f"mixed {self.avg_bits:.2f}b" + grid[grid.index("-") :]
        return grid + (f" + emb{self.embed_bits}" if self.embed_bits else "")

    @property
    def predicted_ppl_ratio(self) -> float:
        return math.exp(self.predicted_kld)  # ln(ppl_q / ppl) is about the mean KL for small KL


@dataclass
class Budget:
    max_size_bytes: int
    max_ppl_ratio: float | None = None
    max_latency_ms: float | None = None


@dataclass
class Plan:
    model: str
    budget: Budget
    original: dict[str, Any]
    sensitivity: dict[str, float]
    candidates: list[Candidate] = field(default_factory=list)
    recommended: Candidate | None = None
    embedding_sensitivity: dict[int, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    objective: str = "kld"  # what picks the recommendation among the verified candidates

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kl(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(ref || model) per position; ref_logp are the original's log-probabilities."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def probe_grid(in_features: int) -> Grid:
    g = PROBE.group_size if in_features % PROBE.group_size == 0 else -1
    return Grid(PROBE.bits, g, PROBE.sym)


def _rtn(grid: Grid) -> RTN:
    return RTN(bits=grid.bits, group_size=grid.group_size, sym=grid.sym)


def layer_sensitivity(model: nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """KL to the original with only one linear quantized by the probe grid, for every linear."""
    with torch.inference_mode():
        ref = F.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
        out = {}
        for site in track(analyze(model).linears, "sensitivity"):
            w = site.module.weight.data
            probe = _rtn(probe_grid(w.shape[1]))
            site.module.weight.data = rtn_quantize(w, probe).dequantize().to(w.dtype)
            try:
                out[site.name] = max(_kl(ref, model(input_ids=windows).logits), 0.0)
            finally:
                site.module.weight.data = w
    return out


def embedding_sensitivity(model: nn.Module, windows: torch.Tensor) -> dict[int, float]:
    """KL to the original with only the embeddings (and head) quantized, per embed bit width."""
    import copy

    from tinyllm.quant.api import quantize

    with torch.inference_mode():
        ref = F.log_softmax(model(input_ids=windows).logits.float(), dim=-1)
    out = {}
    for bits in (b for b in EMBED_BITS if b):
        m = copy.deepcopy(model)
        quantize(m, embed_step(bits))
        with torch.inference_mode():
            out[bits] = max(_kl(ref, m(input_ids=windows).logits), 0.0)
        del m
    return out


def embedding_bytes(model: nn.Module, bits: int | None) -> int:
    """Bytes of the embedding table and head: float16, or packed with g32 scales/zeros."""
    from tinyllm.quant.embed import tied_head

    emb = model.get_input_embeddings().weight
    tables = 1 if tied_head(model) or model.get_output_embeddings() is None else 2
    if bits is None:
        return 2 * emb.numel() * tables
    return quantized_bytes(*emb.shape, Grid(bits, embed_step(bits).group_size, True)) * tables


def weight_error(w: torch.Tensor, grid: Grid) -> float:
    """||W - RTN(W)||^2 on `grid`: the rounding rtn_quantize does, without packing the codes."""
    from tinyllm.kernels.primitives import fake_quant, group_qparams, grouped

    scale, zero = group_qparams(w, grid.bits, grid.group_size, grid.sym)
    g = grouped(w.float(), grid.group_size)  # [rows, groups, gs]
    wq = fake_quant(g, scale.half().float()[..., None], zero[..., None], grid.bits)
    return float((wq - g).pow(2).sum())


def quantized_bytes(out_f: int, in_f: int, grid: Grid) -> int:
    """Bytes on disk of one packed linear: codes, float16 scale and uint8 zero per group."""
    groups = 1 if grid.group_size == -1 else in_f // grid.group_size
    return math.ceil(out_f * in_f * grid.bits / 8) + out_f * groups * 3


def model_bytes(model: nn.Module, grid: Grid, embed_bits: int | None = None) -> int:
    """Checkpoint size with every block linear on `grid`, the embeddings (and head) in float16 or
    quantized to `embed_bits`, everything else in float16."""
    from tinyllm.models.size import param_count

    linears = analyze(model).linears
    n_lin = sum(s.module.weight.numel() for s in linears)
    packed = sum(quantized_bytes(*s.module.weight.shape, grid) for s in linears)
    rest = 2 * (param_count(model) - n_lin) - embedding_bytes(model, None)
    return packed + rest + embedding_bytes(model, embed_bits)


def candidate_grids(group_sizes=GROUPS, bits=BITS) -> list[Grid]:
    return [Grid(b, g, s) for b in bits for g in group_sizes for s in (False, True)]


def predict(
    model: nn.Module,
    sens: dict[str, float],
    grids: list[Grid],
    embed_sens: dict[int, float] | None = None,
) -> tuple[list[Candidate], dict[Grid, dict[str, float]]]:
    """Predicted KL and exact size of every uniform grid (x every embedding option measured).
    -> (candidates, per grid the predicted KL of each layer alone on it)"""
    sites = analyze(model).linears
    probe = {
        s.name: weight_error(s.module.weight.data, probe_grid(s.module.in_features)) for s in sites
    }
    cands = []
    costs: dict[Grid, dict[str, float]] = {}  # predicted KL of each layer alone on each grid
    for grid in track(grids, "predicting"):
        if any(grid.group_size > 0 and s.module.in_features % grid.group_size for s in sites):
            continue
        costs[grid] = {
            s.name: sens[s.name]
            * weight_error(s.module.weight.data, grid)
            / max(probe[s.name], 1e-20)
            for s in sites
        }
        kld = sum(costs[grid].values())
        cands.append(Candidate(grid, model_bytes(model, grid), kld))
        for bits, extra in (embed_sens or {}).items():
            cands.append(Candidate(grid, model_bytes(model, grid, bits), kld + extra, None, bits))
    return cands, costs


def mixed_candidates(
    model: nn.Module,
    costs: dict[Grid, dict[str, float]],
    budget: Budget,
    embed_sens: dict[int, float] | None = None,
) -> list[Candidate]:
    """For each group size and symmetry (and embedding option), the per-layer widths from
    MIXED_BITS with the least summed predicted KL whose model fits the size budget."""
    from tinyllm.quant.mixed import allocate

    sites = analyze(model).linears
    numel = {s.name: s.module.weight.numel() for s in sites}
    out = []
    for g in GROUPS:
        for sym in (False, True):
            grids = [Grid(b, g, sym) for b in MIXED_BITS]
            if any(gr not in costs for gr in grids):
                continue  # the group size does not divide every layer
            loss = torch.tensor([[costs[gr][s.name] for gr in grids] for s in sites])
            cost = torch.tensor(
                [[quantized_bytes(*s.module.weight.shape, gr) for gr in grids] for s in sites]
            )
            for eb, extra in [(None, 0.0), *(embed_sens or {}).items()]:
                rest = model_bytes(model, grids[0], eb) - int(cost[:, 0].sum())
                room = budget.max_size_bytes - rest
                if room < int(cost[:, 0].sum()):
                    continue
                picks = allocate(loss, cost, room).tolist()
                bits = {s.name: MIXED_BITS[k] for s, k in zip(sites, picks, strict=True)}
                size = rest + sum(int(cost[i, k]) for i, k in enumerate(picks))
                kld = sum(float(loss[i, k]) for i, k in enumerate(picks)) + extra
                avg = sum(numel[n] * b for n, b in bits.items()) / sum(numel.values())
                out.append(Candidate(grids[0], size, kld, None, eb, bits, avg))
    return out


def gguf_candidates(
    model: nn.Module,
    sens: dict[str, float],
    budget: Budget,
    embed_sens: dict[int, float] | None = None,
) -> list[Candidate]:
    """GGUF type mixes (and embedding options) with the least summed predicted KL whose size fits
    the budget: each layer's KL on type t is predicted as sens * e(t) / e(probe), e(t) the
    layer's squared RTN error on t's grid (the K-quant search for K types); a type whose blocks
    do not tile the layer is not offered. Block linears count their GGUF bytes."""
    from tinyllm.quant.common import gguf_bpw, gguf_fits, gguf_grid, gguf_type_bits
    from tinyllm.quant.mixed import DEFAULT_TYPES, allocate

    types = sorted(DEFAULT_TYPES, key=gguf_bpw)
    sites = analyze(model).linears
    loss, cost = [], []
    for s in track(sites, "GGUF types"):
        w = s.module.weight.data.float()
        probe = max(weight_error(w, probe_grid(w.shape[1])), 1e-20)
        row_loss = []
        for t in types:
            if not gguf_fits(t, w.shape[1]):
                row_loss.append(math.inf)
                continue
            wq = rtn_quantize(w, RTN(**gguf_grid(t))).dequantize()
            row_loss.append(sens[s.name] * float((wq - w).pow(2).sum()) / probe)
        loss.append(row_loss)
        cost.append([bits // 8 for bits in gguf_type_bits(*w.shape, types)])  # whole bytes
    loss_t, cost_t = torch.tensor(loss, dtype=torch.float64), torch.tensor(cost)
    numel = torch.tensor([s.module.weight.numel() for s in sites], dtype=torch.float64)
    base = Grid(4, 32, True)  # GPTQ's settings; each layer's grid is its type's
    out = []
    for eb, extra in [(None, 0.0), *(embed_sens or {}).items()]:
        rest = model_bytes(model, base, eb) - sum(
            quantized_bytes(*s.module.weight.shape, base) for s in sites
        )
        room = budget.max_size_bytes - rest
        if room < int(cost_t.min(dim=1).values.sum()):
            continue
        picks = allocate(loss_t, cost_t, room)
        chosen = {s.name: types[int(k)] for s, k in zip(sites, picks, strict=True)}
        size = rest + int(cost_t.gather(1, picks[:, None]).sum())
        kld = float(loss_t.gather(1, picks[:, None]).sum()) + extra
        bpw = torch.tensor([gguf_bpw(chosen[s.name]) for s in sites], dtype=torch.float64)
        avg = float((numel * bpw).sum() / numel.sum())
        out.append(Candidate(base, size, kld, None, eb, chosen, avg))
    return out


def pareto(cands: list[Candidate], key=lambda c: c.predicted_kld) -> list[Candidate]:
    """Candidates no other candidate beats on both size and `key` (sorted by size)."""
    front, best = [], math.inf
    for c in sorted(cands, key=lambda c: (c.size_bytes, key(c))):
        if key(c) < best:
            front.append(c)
            best = key(c)
    return front


def fits(c: Candidate, budget: Budget, measured: bool = False) -> bool:
    if c.size_bytes > budget.max_size_bytes:
        return False
    if budget.max_ppl_ratio is not None:
        ratio = c.measured["ppl_ratio"] if measured and c.measured else c.predicted_ppl_ratio
        if ratio > budget.max_ppl_ratio:
            return False
    if measured and budget.max_latency_ms is not None and c.measured:
        return c.measured["decode_ms"] <= budget.max_latency_ms
    return True


def decode_ms(model: nn.Module, repeats: int = 7) -> float:
    """Median time of one decoded token after a 64-token prompt."""
    import statistics

    from transformers import DynamicCache

    prompt = torch.randint(0, model.config.vocab_size, (1, 64))
    token = prompt[:, -1:]
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            cache = DynamicCache()
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            t0 = time.perf_counter()
            model(input_ids=token, past_key_values=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def grid_step(grid: Grid) -> Any:
    from tinyllm.quant.gptq import GPTQ

    return GPTQ(bits=grid.bits, group_size=grid.group_size, sym=grid.sym)


def candidate_step(c: Candidate) -> Any:
    """GPTQ on the candidate's grid; with per-layer widths, the mixed step replaying them."""
    if c.layer_bits is None:
        return grid_step(c.grid)
    from tinyllm.quant.mixed import Mixed

    if c.gguf_mix:
        types = sorted(set(c.layer_bits.values()))
        return Mixed(base=grid_step(c.grid), types=types, allocation=c.layer_bits)
    widths = sorted(set(c.layer_bits.values()))
    return Mixed(base=grid_step(c.grid), bits=widths, allocation=c.layer_bits)


OBJECTIVES = ("kld", "ppl", "task:NAME")


def parse_objective(text: str) -> str:
    """'kld', 'ppl' or 'task:NAME' (checked; a task's name is checked when it first runs)."""
    t = text.strip()
    if t in ("kld", "ppl") or (t.startswith("task:") and len(t) > 5):
        return t
    raise ConfigError(
        f"--objective {text!r}: use kld (the default: KL divergence to the original), ppl "
        "(perplexity) or task:NAME (a task's accuracy, e.g. task:analogy)"
    )


def objective_key(objective: str) -> Callable[[Candidate], tuple]:
    """Sort key of verified candidates by the objective, best first."""
    if objective == "ppl":
        return lambda c: (c.measured["perplexity"],)
    if objective == "kld":
        return lambda c: (c.measured["kld"], c.measured["perplexity"])
    return lambda c: (-c.measured["task"]["accuracy"], c.measured["kld"])


def task_scorer(tok: Any, objective: str, limit: int | None) -> Callable[[nn.Module], dict] | None:
    """For objective task:NAME, model -> the task's result (accuracy, stderr, n); else None."""
    if not objective.startswith("task:"):
        return None
    from tinyllm.eval.lm import ModuleLM
    from tinyllm.eval.tasks import run_tasks

    name = objective.partition(":")[2]
    return lambda m: run_tasks(ModuleLM(m, tok), [name], limit)[name]


def verify(
    spec: str,
    c: Candidate,
    calib: torch.Tensor,
    original: dict,
    score: Any,
    calib_dtype: str = "float32",
    task: Callable[[nn.Module], dict] | None = None,
) -> dict[str, Any]:
    """Quantize for real with GPTQ and score with the evaluation harness (and `task`)."""
    from tinyllm.checkpoint import round_floats
    from tinyllm.core.load import load
    from tinyllm.quant.api import quantize

    model, _ = load(spec)
    t0 = time.perf_counter()
    quantize(model, candidate_step(c), calib=calib, calib_dtype=calib_dtype)
    if c.embed_bits:
        quantize(model, embed_step(c.embed_bits))
    round_floats(model, torch.float16)
    seconds = time.perf_counter() - t0
    res = score(model)
    measured = {
        "perplexity": res.perplexity,
        "ppl_ratio": res.perplexity / original["perplexity"],
        "kld": res.kld,
        "decode_ms": decode_ms(model),
        "quantize_seconds": seconds,
    }
    if task is not None:
        measured["task"] = task(model)
    return measured


def check_budget(budget: Budget) -> None:
    if budget.max_size_bytes <= 0:
        raise ConfigError("--max-size must be positive (e.g. 90MB or 0.35x)")
    if budget.max_ppl_ratio is not None and budget.max_ppl_ratio < 1:
        raise ConfigError(f"--max-ppl-ratio must be at least 1, got {budget.max_ppl_ratio}")


def parse_size(text: str, fp16_bytes: int) -> int:
    """'90MB', '85MiB', '1.5GB', '120000000' or '0.35x' (a fraction of the float16 size)."""
    t = text.strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 1e3, "mb": 1e6, "gb": 1e9, "b": 1}
    try:
        if t.endswith("x"):
            return int(float(t[:-1]) * fp16_bytes)
        for unit, mult in units.items():
            if t.endswith(unit):
                return int(float(t[: -len(unit)]) * mult)
        return int(float(t))
    except ValueError as exc:
        raise ConfigError(
            f"--max-size '{text}' is not a size; write e.g. 90MB, 85MiB, 1.5GB or 0.35x (of the "
            "float16 size)"
        ) from exc


def check_memory(
    spec: str, samples: int, seq_len: int, max_memory: str | None = None, device: str = "cpu"
) -> list[Any]:
    """Refuse (ConfigError, with the numbers) a plan whose compression (streaming GPTQ on its
    calibration windows) or serving (generating from the 4-bit result) would not fit the memory
    budget: `max_memory` ('16GB', '0.5x' of this host's memory) or the host's physical memory.
    -> the two core.estimate Estimates (none where the spec has no config.json, e.g. a .gguf)."""
    from tinyllm.core.estimate import Job, check_fits, estimate, memory_budget
    from tinyllm.errors import ModelLoadError

    host, gpu = memory_budget(device)
    budget = host
    if max_memory is not None:
        try:
            budget = parse_size(max_memory, host)
        except ConfigError as exc:
            raise ConfigError(f"--max-memory '{max_memory}' is not a size (e.g. 16GB)") from exc
    jobs = [Job("compress", "gptq", 4, 128, samples, seq_len, device)]
    jobs.append(Job("generate", "gptq", 4, 128, device=device))
    try:
        estimates = [estimate(spec, job) for job in jobs]
    except ModelLoadError as exc:  # no config.json to read: loading will say what is wrong
        log.info("no memory estimate for %s: %s", spec, exc)
        return []
    check_fits(estimates, budget, gpu)
    return estimates


def recipe_yaml(plan: Plan, c: Candidate, calibration: dict) -> str:
    """A recipe `tinyllm run` accepts for candidate `c`."""
    import yaml

    stages = [{"type": "gptq", **asdict(c.grid)}]
    if c.layer_bits is not None:
        step = candidate_step(c)
        base = {"type": "gptq", **asdict(c.grid)}
        options = {"types": step.types} if c.gguf_mix else {"bits": step.bits}
        stages = [{"type": "mixed", "base": base, **options, "allocation": c.layer_bits}]
    if c.embed_bits:
        step = embed_step(c.embed_bits)
        stages.append({"type": "embeddings", "bits": step.bits, "group_size": step.group_size})
    data: dict[str, Any] = {"model": plan.model, "calibration": calibration, "stages": stages}
    gguf = {(4, 32, True): "q4_0", (4, 32, False): "q4_1", (5, 32, True): "q5_0"}
    gguf.update({(5, 32, False): "q5_1", (8, 32, True): "q8_0"})
    qtype = None if c.layer_bits else gguf.get((c.grid.bits, c.grid.group_size, c.grid.sym))
    if c.embed_bits and c.embed_bits not in (4, 8):
        qtype = None
    elif c.gguf_mix:
        qtype = "auto"  # each layer in its type
    if qtype:
        data["export"] = [{"format": "gguf", "type": qtype, "strict": True}]
    head = (
        f"# planned by `tinyllm plan` for max size {plan.budget.max_size_bytes / 2**20:.1f} MiB: "
        f"GPTQ {c.label}, {c.size_bytes / 2**20:.1f} MiB\n"
    )
    return head + yaml.safe_dump(data, sort_keys=False)


def plan_settings(
    calibration: dict[str, Any], evaluation: dict[str, Any], verify_top: int
) -> tuple[Any, Any]:
    """(Calibration, Evaluation) from plain settings, checked before anything loads: a bad value
    is a ConfigError naming the field."""
    from pydantic import ValidationError

    from tinyllm.pipeline.recipe import Calibration, Evaluation
    from tinyllm.util.validation import first_error

    try:
        cal, ev = Calibration(**calibration), Evaluation(**evaluation)
    except ValidationError as exc:
        raise ConfigError(f"plan: {first_error(exc)}") from exc
    if verify_top < 1:
        raise ConfigError("--verify-top must be at least 1")
    return cal, ev


def make_plan(
    spec: str,
    max_size: str,
    max_ppl_ratio: float | None = None,
    max_latency_ms: float | None = None,
    calibration: Any = None,
    evaluation: Any = None,
    probe_windows: int = 2,
    probe_seq_len: int = 256,
    verify_top: int = 3,
    grids: list[Grid] | None = None,
    embeddings: bool = True,
    cache: Any = None,
    mixed: bool = True,
    max_memory: str | None = None,
    objective: str = "kld",
    task_limit: int | None = None,
) -> Plan:
    """Measure sensitivities, predict every grid, verify the best few that fit and recommend the
    best verified one by `objective` (kld, ppl or task:NAME). -> Plan"""
    from tinyllm.core.load import load
    from tinyllm.data.calibration import calibration_windows
    from tinyllm.models.size import param_count
    from tinyllm.pipeline.recipe import Calibration, Evaluation

    cal, ev = calibration or Calibration(), evaluation or Evaluation()
    objective = parse_objective(objective)
    check_memory(spec, cal.samples, cal.seq_len, max_memory)
    model, tok = load(spec)
    budget = Budget(parse_size(max_size, 2 * param_count(model)), max_ppl_ratio, max_latency_ms)
    check_budget(budget)
    t0 = time.perf_counter()
    task = task_scorer(tok, objective, task_limit)
    original = _measure_original(model, tok, ev, task)  # an unknown task fails here, early
    probe = calibration_windows(tok, cal.corpus, probe_windows, probe_seq_len, cal.seed + 1)
    t1 = time.perf_counter()
    sens, embed_sens = _cached_sensitivity(cache, model, probe, embeddings, spec)
    plan = Plan(spec, budget, original, sens, embedding_sensitivity=embed_sens)
    plan.objective = objective
    plan.seconds = {"original_eval": t1 - t0, "sensitivity": time.perf_counter() - t1}
    plan.candidates = _candidates(model, sens, embed_sens, grids, mixed, budget)
    best = _feasible(model, plan.candidates, budget)[:verify_top]
    calib = calibration_windows(tok, cal.corpus, cal.samples, cal.seq_len, cal.seed)
    t2 = time.perf_counter()
    score = _scorer(model, tok, ev)
    pick = (score, task, objective_key(objective))
    plan.recommended = _verify_best(spec, best, calib, original, pick, cal.dtype, budget)
    plan.seconds["verify"] = time.perf_counter() - t2
    return plan


def _candidates(
    model: nn.Module,
    sens: dict[str, float],
    embed_sens: dict[int, float],
    grids: list[Grid] | None,
    mixed: bool,
    budget: Budget,
) -> list[Candidate]:
    """The prediction for every grid (candidate_grids unless given), then (with `mixed`) the
    mixed-precision candidates and the GGUF type mixes."""
    candidates, costs = predict(model, sens, grids or candidate_grids(), embed_sens)
    if mixed:
        candidates += mixed_candidates(model, costs, budget, embed_sens)
        candidates += gguf_candidates(model, sens, budget, embed_sens)
    return candidates


def _verify_best(
    spec: str,
    best: list[Candidate],
    calib: torch.Tensor,
    original: dict[str, Any],
    pick: tuple[Callable[[nn.Module], Any], Callable | None, Callable[[Candidate], tuple]],
    calib_dtype: str,
    budget: Budget,
) -> Candidate | None:
    """Quantize and measure each of `best` for real (verify); `pick` is (scorer, task scorer or
    None, objective sort key). -> the best by the objective among those that still fit the
    budget, or None."""
    score, task, key = pick
    for c in track(best, "verifying"):
        c.measured = verify(spec, c, calib, original, score, calib_dtype, task)
    ok = [c for c in best if fits(c, budget, measured=True)]
    return min(ok, key=key) if ok else None


def _measure_original(
    model: nn.Module, tok: Any, ev: Any, task: Callable[[nn.Module], dict] | None = None
) -> dict[str, Any]:
    """The float model's perplexity, float16 size, decode time (and the objective's task): what
    candidates are held to."""
    from tinyllm.eval.evaluate import evaluate
    from tinyllm.models.size import param_count

    orig = evaluate(model, tok, corpus=ev.corpus, seq_len=ev.seq_len, windows=ev.windows)
    original = {"perplexity": orig.perplexity, "fp16_bytes": 2 * param_count(model)}
    original["decode_ms"] = decode_ms(model)
    if task is not None:
        original["task"] = task(model)
    return original


def _scorer(model: nn.Module, tok: Any, ev: Any) -> Callable[[nn.Module], Any]:
    """Evaluation of a candidate against the float `model` on the evaluation windows `ev`."""
    from tinyllm.eval.evaluate import evaluate

    def score(m: nn.Module) -> Any:
        kw = dict(corpus=ev.corpus, seq_len=ev.seq_len, windows=ev.windows)
        return evaluate(m, tok, reference=(model, tok), **kw)

    return score


def _feasible(model: nn.Module, candidates: list[Candidate], budget: Budget) -> list[Candidate]:
    """The candidates predicted to fit the budget, best predicted first. None is a ConfigError
    that says how small the smallest candidate is and what of it stays in float."""
    feasible = sorted((c for c in candidates if fits(c, budget)), key=lambda c: c.predicted_kld)
    if feasible:
        return feasible
    smallest = min(candidates, key=lambda c: c.size_bytes)
    floats = model_bytes(model, smallest.grid, smallest.embed_bits) - sum(
        quantized_bytes(*s.module.weight.shape, smallest.grid) for s in analyze(model).linears
    )
    ratio = budget.max_ppl_ratio
    raise ConfigError(
        f"no candidate fits {budget.max_size_bytes / 2**20:.1f} MiB"
        + (f" at perplexity ratio {ratio}" if ratio else "")
        + f": the smallest ({smallest.label}) is {smallest.size_bytes / 2**20:.1f} MiB, of"
        f" which {floats / 2**20:.1f} MiB are embeddings, norms and head; raise "
        "--max-size or --max-ppl-ratio"
    )


def _cached_sensitivity(
    cache: Any, model: nn.Module, probe: torch.Tensor, embeddings: bool, spec: str
) -> tuple[dict[str, float], dict[int, float]]:
    """Layer and embedding sensitivities, reused from `cache` (a JSON file) when it was measured
    for the same model and probe windows: a re-run with another budget skips the slow part."""
    import hashlib
    import json
    from pathlib import Path

    from tinyllm.util.fs import write_json_atomic

    key = hashlib.sha256(f"{spec}|{probe.tolist()}|{PROBE}|{embeddings}".encode()).hexdigest()
    path = Path(cache) if cache else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log.info("sensitivities reused from %s", path)
            return saved["layers"], {int(k): v for k, v in saved["embeddings"].items()}
    sens = layer_sensitivity(model, probe)
    embed_sens = embedding_sensitivity(model, probe) if embeddings else {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "layers": sens, "embeddings": embed_sens})
    return sens, embed_sens


def plan_markdown(plan: Plan) -> str:
    b, o = plan.budget, plan.original
    lines = [
        f"# tinyllm plan: {plan.model}",
        "",
        f"Budget: size <= {b.max_size_bytes / 2**20:.1f} MiB"
        + (f", perplexity ratio <= {b.max_ppl_ratio}" if b.max_ppl_ratio else "")
        + (f", decode <= {b.max_latency_ms} ms/token" if b.max_latency_ms else "")
        + f". Original: perplexity {o['perplexity']:.3f}, {o['fp16_bytes'] / 2**20:.1f} MiB in "
        f"float16, {o['decode_ms']:.1f} ms/token"
        + (f", {plan.objective} {_accuracy(o['task'])}" if o.get("task") else "")
        + ".",
        "",
        f"Objective: {_OBJECTIVE_TEXT.get(plan.objective, f'highest {plan.objective} accuracy')} "
        "among the verified candidates that fit.",
        "",
        "Pareto front of the predictions (size vs predicted KL); measured = GPTQ run for real:",
        "",
        "| grid | size | x fp16 | predicted KLD | predicted ppl x | measured ppl | measured x "
        "| measured KLD | decode ms |"
        + (f" {plan.objective} |" if o.get("task") else "")
        + " fits |",
        "|---" * (11 if o.get("task") else 10) + "|",
    ]
    rows = pareto(plan.candidates) + [
        c for c in plan.candidates if c.measured and c not in pareto(plan.candidates)
    ]
    lines += [_markdown_row(plan, c) for c in rows]
    worst = sorted(plan.sensitivity.items(), key=lambda kv: -kv[1])[:8]
    lines += ["", "Most sensitive layers (KL with only that layer at RTN 3-bit g128):", ""]
    lines += [f"- `{k}`: {v:.5f}" for k, v in worst]
    emb = ", ".join(f"{b} bits {v:.5f}" for b, v in plan.embedding_sensitivity.items())
    if emb:
        lines += ["", f"Embeddings and head quantized alone (KL): {emb}."]
    lines += ["", "![Pareto front](front.png)"]
    return "\n".join(lines) + "\n"


def _markdown_row(plan: Plan, c: Candidate) -> str:
    """Candidate c's row of the plan's table."""
    m = c.measured or {}
    cells = [
        c.label + (" **recommended**" if c is plan.recommended else ""),
        f"{c.size_bytes / 2**20:.1f} MiB",
        f"{c.size_bytes / plan.original['fp16_bytes']:.3f}",
        f"{c.predicted_kld:.4f}",
        f"{c.predicted_ppl_ratio:.3f}",
        f"{m['perplexity']:.3f}" if m else "-",
        f"{m['ppl_ratio']:.3f}" if m else "-",
        f"{m['kld']:.4f}" if m else "-",
        f"{m['decode_ms']:.1f}" if m else "-",
        "yes" if fits(c, plan.budget, measured=bool(m)) else "no",
    ]
    if plan.original.get("task"):
        cells.insert(-1, _accuracy(m["task"]) if m.get("task") else "-")
    return "| " + " | ".join(cells) + " |"


_OBJECTIVE_TEXT = {"kld": "lowest measured KLD", "ppl": "lowest measured perplexity"}


def _accuracy(task: dict) -> str:
    """'41.2% ± 3.0%': a task's accuracy and standard error."""
    return f"{task['accuracy']:.1%} ± {task.get('stderr') or 0:.1%}"


def plot_front(plan: Plan) -> bytes:
    """The candidates' predicted and measured perplexity against size, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    o = plan.original
    xs = [c.size_bytes / 2**20 for c in plan.candidates]
    ax.scatter(
        xs,
        [o["perplexity"] * c.predicted_ppl_ratio for c in plan.candidates],
        s=10,
        color="0.6",
        label="predicted",
    )
    front = pareto(plan.candidates)
    ax.plot(
        [c.size_bytes / 2**20 for c in front],
        [o["perplexity"] * c.predicted_ppl_ratio for c in front],
        "-",
        color="C0",
        label="predicted Pareto front",
    )
    done = [c for c in plan.candidates if c.measured]
    ax.scatter(
        [c.size_bytes / 2**20 for c in done],
        [c.measured["perplexity"] for c in done],
        color="C3",
        marker="x",
        s=50,
        label="measured (GPTQ)",
    )
    _budget_and_labels(ax, plan)
    return _png(fig)


def _budget_and_labels(ax: Any, plan: Plan) -> None:
    """The size budget and the original perplexity as lines; axes, legend and grid."""
    ax.axvline(plan.budget.max_size_bytes / 2**20, color="C2", ls="--", label="size budget")
    ax.axhline(plan.original["perplexity"], color="k", lw=0.8, label="original")
    ax.set_yscale("log")
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_plan(plan: Plan, out: Any, calibration: dict) -> dict[str, Any]:
    """plan.json, plan.md, front.png and (if any) recommended.yaml in directory `out`."""
    from pathlib import Path

    from tinyllm.util.fs import atomic_path, write_json_atomic, write_text_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "plan.json", plan.to_dict())
    write_text_atomic(out / "plan.md", plan_markdown(plan))
    with atomic_path(out / "front.png") as tmp:
        tmp.write_bytes(plot_front(plan))
    files = {"json": out / "plan.json", "md": out / "plan.md", "png": out / "front.png"}
    if plan.recommended is not None:
        write_text_atomic(
            out / "recommended.yaml", recipe_yaml(plan, plan.recommended, calibration)
        )
        files["recipe"] = out / "recommended.yaml"
    return files
