"""tinyllm: compress a pretrained LLM, evaluate it, export it and serve it on the edge.

Public API::

    model, tokenizer = tinyllm.load("smollm2-135m")
    calib = tinyllm.calibration_windows(tokenizer, samples=128, seq_len=512)
    tinyllm.quantize(model, tinyllm.GPTQ(bits=4, group_size=64), calib=calib)
    result = tinyllm.evaluate(model, tokenizer)
    tinyllm.save_checkpoint(model, tokenizer, "out/gptq4", {"steps": []})
    tinyllm.prune(model2, tinyllm.SparseGPT(sparsity=0.5), calib=calib)   # docs/pruning.md
    engine = tinyllm.Engine(model, tokenizer)                               # docs/runtime.md
    seqs = engine.generate([tokenizer.encode("Hi")], tinyllm.SamplingParams(max_tokens=16))

One call from a model to a checkpoint, as `tinyllm quantize` and recipes do it (steps in order;
training steps too: Distill, Recover, Movement, IMP)::

    result = tinyllm.compress("smollm2-135m", [tinyllm.Wanda(sparsity=0.3), tinyllm.GPTQ()],
                              tinyllm.Calibration(samples=128), "out/w30-gptq4")
    tinyllm.compress("smollm2-135m", [tinyllm.Distill(layers=15, steps=160)], out="out/s15")
"""

from tinyllm.checkpoint import save_checkpoint
from tinyllm.core.compress import Calibration, CompressResult, compress
from tinyllm.core.load import load
from tinyllm.data.calibration import calibration_windows
from tinyllm.distill.steps import Distill, Recover
from tinyllm.distill.trainer import DistillConfig
from tinyllm.errors import TinyLLMError
from tinyllm.eval.evaluate import EvalResult, evaluate
from tinyllm.models.load import DEFAULT_MODEL
from tinyllm.prune.api import prune
from tinyllm.prune.magnitude import Magnitude
from tinyllm.prune.movement import IMP, Movement
from tinyllm.prune.sparsegpt import SparseGPT
from tinyllm.prune.structured import Blocks, Channels, Heads
from tinyllm.prune.wanda import Wanda
from tinyllm.quant.api import quantize
from tinyllm.quant.awq import AWQ
from tinyllm.quant.fp8 import FP8
from tinyllm.quant.gptq import GPTQ
from tinyllm.quant.int8 import Int8Dynamic, Int8Static
from tinyllm.quant.mixed import Mixed
from tinyllm.quant.nf4 import NF4
from tinyllm.quant.rtn import RTN
from tinyllm.quant.smoothquant import SmoothQuant
from tinyllm.runtime.engine import Engine, EngineConfig
from tinyllm.runtime.sampling import SamplingParams
from tinyllm.util.version import __version__ as __version__

__all__ = [
    "AWQ",
    "DEFAULT_MODEL",
    "FP8",
    "GPTQ",
    "IMP",
    "NF4",
    "RTN",
    "Blocks",
    "Calibration",
    "Channels",
    "CompressResult",
    "Distill",
    "DistillConfig",
    "Engine",
    "EngineConfig",
    "EvalResult",
    "Heads",
    "Int8Dynamic",
    "Int8Static",
    "Magnitude",
    "Mixed",
    "Movement",
    "Recover",
    "SamplingParams",
    "SmoothQuant",
    "SparseGPT",
    "TinyLLMError",
    "Wanda",
    "calibration_windows",
    "compress",
    "evaluate",
    "load",
    "prune",
    "quantize",
    "save_checkpoint",
]
