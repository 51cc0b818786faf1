"""Data-parallel calibration (torch.distributed, gloo on CPU): two processes, each calibrating on
half the windows with every statistic reduced, give what one process gives on all of them, on
every rank; steps that cannot be exact refuse to run data-parallel."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tinyllm.core.compress import Calibration, compress
from tinyllm.errors import ConfigError
from tinyllm.prune.sparsegpt import SparseGPT
from tinyllm.prune.wanda import Wanda
from tinyllm.quant.awq import AWQ
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.int8 import Int8Static
from tinyllm.quant.smoothquant import SmoothQuant
from tinyllm.util import dist

WORLD = 2
CALIB = dict(samples=16, seq_len=32)


def _steps() -> dict[str, list]:
    return {
        "gptq": [GPTQ(bits=4, group_size=32)],
        "gptq-float-targets": [GPTQ(bits=4, group_size=32, float_targets=0.25)],
        "awq-gptq": [AWQ(base=GPTQ(bits=4, group_size=32))],
        "awq-rtn": [AWQ()],  # 512 tokens: no subsample, so exact
        "sparsegpt": [SparseGPT(sparsity=0.5)],
        "wanda": [Wanda(sparsity=0.5)],
        "wanda-owl": [Wanda(sparsity=0.5, allocation="owl")],
        "smoothquant": [SmoothQuant(alpha=0.5)],
    }


REFUSED = {
    "smoothquant alpha search": SmoothQuant(),
    "percentile observer": Int8Static(observer="percentile"),
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every linear's weight as the model computes it (dequantized), codes, activation scales."""
    out: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():
        qw = getattr(m, "qweight", None)
        if qw is not None:
            out[name + ".codes"] = qw.codes().clone()
            out[name + ".weight"] = qw.dequantize().float()
            act = getattr(m, "act", None)
            if act is not None and act.scale is not None:
                out[name + ".act_scale"] = act.scale.float().clone()
        elif isinstance(m, torch.nn.Linear):
            out[name + ".weight"] = m.weight.detach().float().clone()
    return out


def _run_all(source: Path, corpus: Path) -> dict:
    calib = Calibration(corpus=str(corpus), **CALIB)
    result = {name: _state(compress(source, s, calib).model) for name, s in _steps().items()}
    for what, cfg in REFUSED.items():
        try:
            compress(source, [cfg], calib)
            result[what] = "ran"
        except ConfigError as exc:
            result[what] = str(exc)
    return result


def _worker(rank: int, source: str, corpus: str, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        result = _run_all(Path(source), Path(corpus))
        part = torch.arange(rank, 10, WORLD)[:, None].repeat(1, 3)
        result["unshard"] = dist.unshard(part)
        result["world"] = dist.world()
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
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    """(one process's results, each of two processes' results) on the same checkpoint."""
    from tests.conftest import TEXT, tiny_model, tiny_tokenizer

    tmp = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer()
    source = tmp / "tiny"
    tiny_model("llama", vocab=len(tok)).save_pretrained(source)
    tok.save_pretrained(source)
    corpus = tmp / "corpus.txt"
    corpus.write_text(TEXT * 8, encoding="utf-8")
    os.environ.setdefault("TINYLLM_CACHE", str(tmp / "cache"))
    args = (str(source), str(corpus), _free_port(), str(tmp))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    torch.set_num_threads(1)  # the same thread count as the workers
    return _run_all(source, corpus), ranks


def test_every_rank_ends_with_identical_weights(runs) -> None:
    _, ranks = runs
    assert [r["world"] for r in ranks] == [WORLD] * WORLD
    for method in _steps():
        a, b = ranks[0][method], ranks[1][method]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{method}: {key} differs between ranks"


@pytest.mark.parametrize("method", ["gptq", "gptq-float-targets", "awq-gptq", "awq-rtn"])
def test_codes_match_one_process(runs, method: str) -> None:
    """Hessians (and GPTQ's cross terms, AWQ's magnitudes) summed over two processes: at least
    99.9% of the codes equal to one process's (the statistics differ in float summation order
    only; a code can flip where a weight sits on a rounding boundary): dequantized weights
    within one grid step (1.5e-2 on these weights of magnitude below 0.09), 1e-5 on average.
    On this CPU every code was identical for GPTQ, AWQ+GPTQ and AWQ+RTN; with float targets
    14 of 73728 differed (the cross term is summed in another order), by one step each."""
    one, ranks = runs
    a, b = one[method], ranks[0][method]
    codes = [k for k in a if k.endswith(".codes")]
    assert len(codes) == 14  # 7 linears in each of 2 blocks
    same = sum(int((a[k] == b[k]).sum()) for k in codes)
    total = sum(a[k].numel() for k in codes)
    assert same / total >= 0.999, f"{total - same} of {total} codes differ"
    weights = [k for k in a if k.endswith(".weight")]
    diffs = [(a[k] - b[k]).abs() for k in weights]
    assert max(float(d.max()) for d in diffs) <= 1.5e-2
    assert sum(float(d.sum()) for d in diffs) / sum(d.numel() for d in diffs) <= 1e-5


@pytest.mark.parametrize(("method", "atol"), [("wanda", 0), ("wanda-owl", 0), ("sparsegpt", 1e-4)])
def test_masks_match_one_process(runs, method: str, atol: float) -> None:
    """Pruning masks from column norms (Wanda, OWL's ratios) or Hessians (SparseGPT) reduced
    over two processes equal one process's; so do the weights (SparseGPT's updated survivors
    to float rounding: 3e-5 at most on this CPU)."""
    one, ranks = runs
    a, b = one[method], ranks[0][method]
    pruned = [k for k in a if "layers" in k]
    assert pruned and all(float((a[k] == 0).float().mean()) >= 0.4 for k in pruned)
    for k in pruned:
        assert torch.equal(a[k] == 0, b[k] == 0), f"{k}: masks differ"
        assert torch.allclose(a[k], b[k], rtol=0, atol=atol), k


def test_smoothquant_matches_one_process(runs) -> None:
    """SmoothQuant with a given alpha and static minmax ranges: maxima reduced by max, so the
    smoothing factors and activation scales agree to float rounding."""
    one, ranks = runs
    a, b = one["smoothquant"], ranks[0]["smoothquant"]
    scales = [k for k in a if k.endswith(".act_scale")]
    assert scales
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6), k


def test_inexact_steps_refuse_data_parallel_and_run_alone(runs) -> None:
    one, ranks = runs
    for what in REFUSED:
        assert one[what] == "ran"
        for r in ranks:
            assert "cannot run data-parallel over 2 processes" in r[what], r[what]
    assert "--alpha" in ranks[0]["smoothquant alpha search"]
    assert "--observer minmax" in ranks[0]["percentile observer"]


def test_unshard_restores_the_order_of_uneven_shards(runs) -> None:
    _, ranks = runs
    expected = torch.arange(10)[:, None].repeat(1, 3)
    for r in ranks:
        assert torch.equal(r["unshard"], expected)


def test_helpers_are_no_ops_in_one_process() -> None:
    t = torch.tensor([1.5, -2.0])
    windows = torch.arange(12).reshape(4, 3)
    assert dist.world() == 1 and dist.rank() == 0
    assert dist.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.5, -2.0]))
    assert dist.shard(windows) is windows and dist.unshard(windows) is windows
    assert dist.mean_over_ranks(0.25, 7.0) == 0.25 and dist.sum_over_ranks(3.0) == 3.0
    dist.refuse("anything", "no reason", "nothing")  # one process: never refused
    assert dist.rank_device(torch.device("cpu")) == torch.device("cpu")
