"""The same work on a GPU as on the CPU: packed layers, evaluation, generation, GPTQ and the
commands, compared with their CPU results (close, not bit for bit). Marked `gpu`: skipped where
CUDA is absent; run them alone with `pytest -m gpu` on a machine with one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from tests.test_cli import run
from tinyllm.kernels.actquant import ActivationQuant, static_spec
from tinyllm.kernels.layouts import int_mm
from tinyllm.kernels.qlinear import ActQuantLinear, QuantEmbedding, QuantLinear
from tinyllm.quant.int8 import int8_weight
from tinyllm.quant.rtn import RTN, rtn_quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _records() -> dict:
    from tinyllm.quant.nf4 import NF4, nf4_quantize

    return {
        "q4-g32": lambda w: rtn_quantize(w, RTN(bits=4, group_size=32, sym=True)),
        "q8-row": lambda w: rtn_quantize(w, RTN(bits=8, group_size=-1, sym=True)),
        "3bit": lambda w: rtn_quantize(w, RTN(bits=3, group_size=32)),
        "nf4": lambda w: nf4_quantize(w, NF4(block_size=64)),
    }


@pytest.mark.parametrize("name", ["q4-g32", "q8-row", "3bit", "nf4"])
@pytest.mark.parametrize("rows", [1, 7, 80])
def test_a_packed_layer_on_the_gpu_matches_the_cpu_and_comes_back_exactly(name, rows) -> None:
    torch.manual_seed(0)
    layer = QuantLinear(_records()[name](torch.randn(96, 256)), torch.randn(96))
    cpu_kernel = layer.kernel
    x = torch.randn(rows, 256)
    y = layer(x)
    layer.to("cuda")
    assert layer.kernel == "dequant" and layer.qweight.packed.is_cuda
    torch.testing.assert_close(layer(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)
    layer.to("cpu")
    assert layer.kernel == cpu_kernel and not layer.qweight.packed.is_cuda
    assert torch.equal(layer(x), y)  # the CPU layout again, repacked from the same record


@pytest.mark.parametrize(
    "spec",
    [
        ActivationQuant("int8", "token"),
        static_spec(torch.tensor([-3.0]), torch.tensor([4.0]), False, "int8", "tensor"),
        static_spec(-torch.rand(48) * 4, torch.rand(48) * 4, False, "int8", "channel"),
        ActivationQuant("fp8_e4m3", "token"),
    ],
    ids=["token", "tensor-asym", "channel-asym", "fp8"],
)
@pytest.mark.parametrize("rows", [1, 16, 40])
def test_an_activation_quantized_layer_on_the_gpu_matches_the_cpu(spec, rows) -> None:
    from tinyllm.quant.fp8 import FP8, fp8_quantize

    torch.manual_seed(0)
    w, b = torch.randn(40, 48), torch.randn(40)
    if spec.dtype == "int8":
        qw = int8_weight(w * spec.scale if spec.granularity == "channel" else w)
    else:
        qw = fp8_quantize(w, FP8())
    layer = ActQuantLinear(qw, spec, b)
    x = torch.randn(rows, 48) * 2
    y = layer(x)
    layer.to("cuda")
    torch.testing.assert_close(layer(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)


def test_int_mm_on_the_gpu_takes_any_shape_exactly() -> None:
    torch.manual_seed(0)
    for m, k, n in [(1, 48, 40), (16, 64, 32), (17, 64, 32), (3, 50, 30)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        got = int_mm(a.cuda(), b.cuda().t()).cpu()
        assert torch.equal(got, a.int() @ b.int().t()), (m, k, n)


def test_a_packed_embedding_on_the_gpu_reads_the_same_rows() -> None:
    torch.manual_seed(0)
    embed = QuantEmbedding(rtn_quantize(torch.randn(64, 32), RTN(bits=4, group_size=32)))
    ids = torch.tensor([[3, 3, 60, 0]])
    y = embed(ids)
    embed.to("cuda")
    assert torch.equal(embed(ids.cuda()).cpu(), y)


def test_evaluate_on_the_gpu_matches_the_cpu(tokenizer, corpus_file: Path) -> None:
    import tinyllm

    model, ref = tiny_model(vocab=len(tokenizer)), tiny_model(vocab=len(tokenizer), seed=1)
    kw = dict(corpus=corpus_file, seq_len=16, windows=4, reference=(ref, tokenizer))
    cpu = tinyllm.evaluate(model, tokenizer, **kw, device="cpu")
    gpu = tinyllm.evaluate(model, tokenizer, **kw, device="cuda")
    assert next(model.parameters()).is_cuda and next(ref.parameters()).is_cuda
    assert gpu.perplexity == pytest.approx(cpu.perplexity, rel=1e-4)
    assert gpu.kld == pytest.approx(cpu.kld, rel=1e-3, abs=1e-6)
    assert gpu.tokens == cpu.tokens


@pytest.mark.parametrize("quantized", [False, True])
def test_generate_on_the_gpu_follows_the_cpu(tokenizer, quantized: bool) -> None:
    from tinyllm.quant.api import quantize
    from tinyllm.runtime.engine import Engine, EngineConfig
    from tinyllm.runtime.sampling import SamplingParams

    outputs, devices = [], []
    for device in ("cpu", "cuda"):
        model = tiny_model(vocab=len(tokenizer))
        if quantized:
            quantize(model, RTN(bits=4, group_size=32))
        cfg = EngineConfig(kv_memory_mb=1.0, kv_dtype="float32", device=device)
        engine = Engine(model, tokenizer, cfg)
        prompts = [tokenizer.encode("The quick brown"), tokenizer.encode("Pack my box")]
        seqs = engine.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))
        outputs.append([s.output for s in seqs])
        devices.append(engine.cache.k[0].device.type)
    assert devices == ["cpu", "cuda"]
    assert [len(o) for o in outputs[1]] == [8, 8]
    assert outputs[1] == outputs[0]  # greedy: a tie within float rounding would be a fluke


def test_gptq_on_the_gpu_is_close_to_the_cpu(tiny_dir: Path, corpus_file: Path, tmp_path) -> None:
    from tinyllm.core.compress import Calibration, compress
    from tinyllm.quant.gptq import GPTQ

    cal = Calibration(corpus=str(corpus_file), samples=4, seq_len=32)
    step = GPTQ(bits=4, group_size=32)
    cpu = compress(tiny_dir, [step], cal, tmp_path / "cpu", device="cpu").model
    gpu = compress(tiny_dir, [step], cal, tmp_path / "gpu", device="cuda").model
    pairs = [
        (a, b)
        for a, b in zip(cpu.modules(), gpu.modules(), strict=True)
        if isinstance(a, QuantLinear)
    ]
    assert pairs
    for a, b in pairs:
        wa, wb = a.qweight.dequantize(), b.qweight.dequantize().cpu()
        same = (a.qweight.codes() == b.qweight.codes().cpu()).float().mean()
        assert same > 0.9  # float summation order flips a few roundings, no more
        assert (wa - wb).norm() / wa.norm() < 0.05
    assert (tmp_path / "gpu" / "model.safetensors").is_file()


@pytest.mark.parametrize("stream", ["off", "on"])
def test_offloaded_activations_on_the_gpu_give_its_result(
    tiny_dir: Path, corpus_file: Path, tmp_path: Path, stream: str
) -> None:
    """Activations kept in CPU memory (offload on) while blocks compute on the GPU: the same
    computations in the same order as with them on the GPU, so the same codes."""
    from tinyllm.core.compress import Calibration, compress
    from tinyllm.quant.gptq import GPTQ

    cal = Calibration(corpus=str(corpus_file), samples=4, seq_len=32)
    step = GPTQ(bits=4, group_size=32)
    runs = {}
    for offload in ("off", "on"):
        out = tmp_path / offload
        compress(tiny_dir, [step], cal, out, device="cuda", stream=stream, offload=offload)
        runs[offload] = {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}
    assert runs["on"] == runs["off"]


def test_the_commands_run_on_the_gpu(tiny_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    p = run("quantize", str(tiny_dir), "--method", "gptq", "--group-size", "32",
            "--calib-corpus", str(corpus_file), "--samples", "4", "--seq-len", "32",
            "--device", "cuda", "-o", str(out))  # fmt: skip
    assert p.returncode == 0, p.stderr
    scores = []
    for device in ("cpu", "cuda"):
        js = tmp_path / f"{device}.json"
        p = run("eval", str(out), "--corpus", str(corpus_file), "--seq-len", "16",
                "--windows", "3", "--device", device, "--json", str(js))  # fmt: skip
        assert p.returncode == 0, p.stderr
        scores.append(json.loads(js.read_text())["perplexity"])
    assert scores[1] == pytest.approx(scores[0], rel=1e-4)
    p = run("generate", str(out), "The quick", "--max-tokens", "5", "--device", "cuda")
    assert p.returncode == 0 and "tokens, finish:" in p.stderr, p.stderr


def test_task_scoring_on_the_gpu_matches_the_cpu(tokenizer) -> None:
    from tinyllm.eval.lm import ModuleLM
    from tinyllm.eval.tasks import run_tasks

    model = tiny_model("llama", vocab=len(tokenizer))
    reqs = [([0, 5, 9, 12], [40, 41]), ([0, 7], [3]), ([0, 7], [4])]
    cpu = ModuleLM(model, tokenizer, "cpu")
    want, want_gen = cpu.loglikelihood(reqs), cpu.generate([([0, 5, 9], 4)])
    want_tasks = run_tasks(cpu, ["polarity", "analogy-gen"], limit=4)
    gpu = ModuleLM(model.to("cuda"), tokenizer, "gpu")
    for (a, ga), (b, gb) in zip(gpu.loglikelihood(reqs), want, strict=True):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    assert gpu.generate([([0, 5, 9], 4)]) == want_gen
    got_tasks = run_tasks(gpu, ["polarity", "analogy-gen"], limit=4)
    assert {k: v["n"] for k, v in got_tasks.items()} == {k: v["n"] for k, v in want_tasks.items()}
