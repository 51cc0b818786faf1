"""The options and --help texts of `tinyllm quantize`, `prune` and `distill` (one alias per
option, so the command functions in cli/compress.py stay short). Method lists come from the step
registry (core/registry.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyllm.core import registry


def _bar(names: list[str]) -> str:
    return " | ".join(names)


QUANTIZE_HELP = """\
Quantize the linear layers of the decoder blocks and write a packed checkpoint.

Calibrated methods (gptq, awq) run block by block on SAMPLES windows of SEQ_LEN tokens drawn
with SEED from outside the corpus's evaluation slice. The output directory holds the packed
safetensors weights, the tokenizer, tinyllm.json (method and every setting) and
layer_errors.json; `tinyllm eval DIR` and `tinyllm.load(DIR)` read it back. An option of
another method (`--method rtn --damp 0.1`) is an error that lists the method's options.
`tinyllm.compress(model, steps, calibration, out)` does the same from Python.

Blocks compute on --device (auto, the default: a GPU when one is present, else the CPU; cpu;
cuda or cuda:N); codes from a GPU match the CPU's up to float rounding, not bit for bit.

Examples:

  tinyllm quantize smollm2-135m --method gptq --bits 4 --group-size 64 -o out/gptq-4b

  tinyllm quantize smollm2-135m --method awq --base gptq --group-size 32 --sym -o out/q4

  tinyllm quantize smollm2-135m --method rtn --bits 8 --group-size -1 --sym -o out/int8

  tinyllm quantize smollm2-135m --gguf-compatible q4_0 --embed-bits 8 -o out/q4-e8

  tinyllm quantize smollm2-135m --method smoothquant -o out/w8a8   (alpha searched)

  tinyllm quantize smollm2-135m --method int8-dynamic -o out/w8a8-dyn

  tinyllm quantize smollm2-135m --method mixed --avg-bits 3.5 --base gptq -o out/mixed

  tinyllm quantize smollm2-135m --method mixed --base gptq --target-bpw 4.8 -o out/mix
    (a GGUF type per layer by measured KL; then `tinyllm export out/mix --type auto`)

Methods that quantize activations write an activation report (per-layer input outlier
ratios) beside the checkpoint; `tinyllm outliers MODEL` prints it for any model.
"""

PRUNE_HELP = """\
Prune the decoder blocks and write a checkpoint (sparse layers stored as mask + values).

Unstructured and N:M methods zero weights: magnitude (smallest |W|), wanda (|W| * ||X||,
per output row), sparsegpt (OBS updates through the inverse Hessian; --bits fuses GPTQ-style
quantization). --allocation owl gives blocks with more activation outliers less sparsity at
the same overall ratio. Structured methods shrink tensors and rewrite the config: channels
(FFN), heads (whole KV groups), blocks (lowest block influence). Prune before quantizing.

Training methods use the distillation trainer with the dense model as teacher and write a
training directory (the pruned model in OUTPUT/model): movement (scores -W*grad accumulated
while fine-tuning, sparsity raised on a cubic schedule), imp (ROUNDS rounds of magnitude
pruning and retraining in OUTPUT/round-R, --rewind for lottery-ticket rewinding).

Blocks (and the trainer of movement and imp) compute on --device (auto, the default: a GPU
when one is present, else the CPU; cpu; cuda or cuda:N).

Examples:

  tinyllm prune smollm2-135m --method wanda --sparsity 0.5 -o out/wanda50

  tinyllm prune smollm2-135m --method sparsegpt --pattern 2:4 -o out/sgpt24

  tinyllm prune smollm2-135m --method channels --sparsity 0.25 -o out/ffn25

  tinyllm prune smollm2-135m --method heads --count 1 --importance gradient -o out/kv

  tinyllm prune smollm2-135m --method blocks --count 4 -o out/drop4

  tinyllm prune smollm2-135m --method movement --sparsity 0.5 --steps 300 -o out/move50
"""

DISTILL_HELP = """\
Train a student to behave like its teacher: L = alpha*KD + beta*task + gamma*feature.

Trains on the corpus outside its evaluation slice; evaluates perplexity and KL to the teacher
before, every EVAL_EVERY steps and after. OUTPUT gets model/ (the student: `tinyllm eval
OUTPUT/model`), checkpoint/ (for --resume; Ctrl-C saves one), log.csv, log.json, loss.png and
summary.json (perplexities, recovery, tokens/s, peak RSS). Runs under
`torchrun --nproc_per_node=N` with DistributedDataParallel (batch is per process). The
trainer runs on --device (auto, the default: a GPU when one is present, else the CPU).

Examples:

  tinyllm distill --layers 15 --steps 400 -o out/student15

  tinyllm distill --student out/gptq-3b --steps 60 --lr 1e-4 -o out/qat-3b

  tinyllm distill --student out/gptq-3b --train scales --lr 3e-3 --steps 60 -o out/qat-3b-scales

  torchrun --nproc_per_node=2 -m tinyllm.cli distill --layers 15 -o out/ddp
"""


class Quant:
    """Options of `tinyllm quantize`."""

    Method = Annotated[
        str,
        typer.Option(
            help=f"One of {_bar(registry.names('quantize'))}: weight-only rtn, gptq, awq, nf4, "
            "embeddings (only embeddings and head); per-layer bits: mixed; weights and "
            "activations: int8-dynamic, int8-static, smoothquant, fp8."
        ),
    ]
    Base = Annotated[
        str, typer.Option(help="awq: rtn | gptq; mixed: rtn | gptq | awq (the wrapped method).")
    ]
    Bits = Annotated[int, typer.Option(help="2, 3, 4, 5 or 8 (nf4: always 4).")]
    GroupSize = Annotated[
        int,
        typer.Option(
            help="Input columns sharing a scale: 32, 64, 128, or -1 for one per output channel "
            "(nf4: its block size, 32, 64 or 128)."
        ),
    ]
    Sym = Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (no zero point).")]
    Mse = Annotated[
        bool,
        typer.Option(
            help="Search each group's clipping range (MSE). AWQ with --clip sets its base's "
            "range by its own output-error search instead (see --base-search)."
        ),
    ]
    ActOrder = Annotated[bool, typer.Option(help="GPTQ: columns by decreasing Hessian diagonal.")]
    StaticGroups = Annotated[bool, typer.Option(help="GPTQ: group grids fixed before updates.")]
    Damp = Annotated[float, typer.Option(help="GPTQ: dampening, fraction of mean diag(H).")]
    FloatTargets = Annotated[
        float,
        typer.Option(
            help="GPTQ (also as AWQ's base): strength (0-1, 0 = off; GPTAQ uses 0.25) of moving "
            "each layer toward the float model's outputs rather than the float weights' outputs "
            "on the quantized model's inputs; one more block pass per block."
        ),
    ]
    TrueSequential = Annotated[
        bool | None,
        typer.Option(
            "--true-sequential/--no-true-sequential",
            help="GPTQ (also as AWQ's base): quantize each block's layers in stages (q/k/v, o, "
            "gate/up, down), each stage calibrated on inputs through the quantized earlier "
            "stages. Default: on for GPTQ without --float-targets (the stages then take about "
            "one block forward, less than unstaged calibration's two), off with float targets "
            "or under AWQ (there they cost about a third more forward work).",
            show_default=False,
        ),
    ]
    WeightedGrid = Annotated[
        bool,
        typer.Option(
            help="GPTQ (also as AWQ's base): weigh each column's error in the group clipping "
            "search by its inputs' mean square (diag H), as an importance matrix does "
            "(smollm2-135m 4-bit g64: 1.17x -> 1.12x FP32 perplexity). With AWQ, whose own "
            "clipping search runs first, it helped at 4 bits and hurt at 3.",
        ),
    ]
    RefitScales = Annotated[
        int,
        typer.Option(
            min=0,
            max=8,
            help="GPTQ (also as AWQ's base): rounds of least-squares refitting of each row's "
            "group scales on the layer's output error, codes fixed; each round after the first "
            "reruns the column loop on the refitted grids first. 0 = off.",
        ),
    ]
    Clip = Annotated[
        bool, typer.Option(help="AWQ: search each group's clipping range on calibration inputs.")
    ]
    BaseSearch = Annotated[
        bool,
        typer.Option(
            help="AWQ with --clip: let the base (RTN or GPTQ) run its own weight-space clipping "
            "search (--mse) after AWQ's; off: AWQ's clamped range is the grid, as in the paper."
        ),
    ]
    GgufCompatible = Annotated[
        str | None,
        typer.Option(
            help="q4_0 | q4_1 | q5_0 | q5_1 | q8_0: set --bits, --group-size 32 and --sym/--asym "
            "to that GGUF block grid (and GPTQ static groups), so `tinyllm export --type` "
            "carries the integers exactly. q2_k | q3_k | q4_k | q5_k | q6_k: llama.cpp's "
            "K-quant super-block grids (scales and mins quantized per 256 weights, chosen by a "
            "search weighted by the inputs' mean square); layers whose inputs are not a "
            "multiple of 256 get the grid llama.cpp falls back to (q5_0, q5_1, q8_0; q4_0 for "
            "q2_k/q3_k). iq4_nl: llama.cpp's non-uniform 4-bit table, a float16 scale per 32 "
            "weights (same size as q4_0, finer near zero). iq4_xs: the same table, each 32's "
            "scale a 6-bit multiple of a float16 per 256 (4.25 bits per weight; rows not a "
            "multiple of 256 get iq4_nl, as llama.cpp falls back)."
        ),
    ]
    EmbedBits = Annotated[
        int | None,
        typer.Option(
            help="Also quantize the token embeddings and output head (RTN, symmetric, MSE "
            "clipping, one scale per row at 8 bits and per 32 values below; a tied head shares "
            "the table) to this many bits: 8 or 4 for GGUF q8_0/q4_0. Default: they stay float."
        ),
    ]
    Activations = Annotated[
        str,
        typer.Option(
            help="smoothquant, fp8: static (ranges fixed from calibration) or dynamic (per-token "
            "scales at run time). Default: static for smoothquant, dynamic for fp8."
        ),
    ]
    Observer = Annotated[
        str,
        typer.Option(
            help="Static activations: minmax (extremes seen), percentile (--percentile of each "
            "tail) or mse (range that minimises the rounding error)."
        ),
    ]
    Granularity = Annotated[
        str,
        typer.Option(
            help="Static int8 activations: one scale per tensor, or per input channel (folded "
            "into the weight's columns, so the GEMM stays integer)."
        ),
    ]
    Percentile = Annotated[float, typer.Option(help="Percentile observer's p, in (50, 100].")]
    ActSym = Annotated[
        bool,
        typer.Option("--act-sym/--act-asym", help="Static activations: symmetric or zero point."),
    ]
    Alpha = Annotated[
        float | None,
        typer.Option(
            help="SmoothQuant migration strength in [0, 1]; omitted: searched (--alpha-search)."
        ),
    ]
    AlphaSearch = Annotated[
        str, typer.Option(help="SmoothQuant: search alpha per layer (group) or per model.")
    ]
    Fp8Format = Annotated[str, typer.Option(help="FP8: e4m3 or e5m2.")]
    AvgBits = Annotated[
        float | None,
        typer.Option(help="mixed: budget as mean bits per linear weight (codes), e.g. 3.5."),
    ]
    SizeMb = Annotated[
        float | None,
        typer.Option(help="mixed: budget as MiB of the block linears (codes, scales, zeros)."),
    ]
    CandidateBits = Annotated[
        str, typer.Option(help="mixed: widths a layer may get, comma-separated.")
    ]
    CandidateTypes = Annotated[
        str,
        typer.Option(
            help="mixed over GGUF types: the types a layer may get, comma-separated (q2_k..q6_k, "
            "q4_0, q4_1, iq4_nl, q5_0, q5_1, q8_0); each layer gets one type's whole grid, chosen "
            "by measured KL, and `tinyllm export --type auto` writes it as that type. Default "
            "with --target-bpw: q2_k,q3_k,q4_k,q5_k,q6_k,q4_0,iq4_nl,q5_0,q8_0."
        ),
    ]
    LayoutFrom = Annotated[
        Path | None,
        typer.Option(
            help="mixed: put every block linear on the GGUF type its tensor has in this GGUF file "
            "(e.g. llama-quantize's Q4_K_M of the same model), no sensitivity measured: the same "
            "layout with tinyllm's codes; `tinyllm export --type auto` writes it."
        ),
    ]
    SensitivityCache = Annotated[
        str | None,
        typer.Option(
            help="mixed: JSON file of the measured per-layer sensitivities; reused when it covers "
            "every layer and option (another budget is then seconds, not minutes), else measured "
            "and written. One file per model and calibration corpus."
        ),
    ]
    Sensitivity = Annotated[
        str,
        typer.Option(
            help="mixed: how a layer's sensitivity is measured. kld: the next-token KL with that "
            "layer alone quantized (re-runs every later block per layer and option: in memory "
            "only). block: the squared error the layer adds to its own block's output, one pass "
            "over the blocks (block-local: a streamed model measures it; cheaper, blind to what "
            "an error does after its block)."
        ),
    ]
    TargetBpw = Annotated[
        float | None,
        typer.Option(
            help="mixed over GGUF types: budget as GGUF bits per weight of the block linears, "
            "scales and mins included (llama.cpp's bpw: Q4_K 4.5, Q5_0 5.5, Q6_K 6.56), e.g. 4.8."
        ),
    ]
    FloatDtype = Annotated[
        str,
        typer.Option(
            help="Precision of the tensors left in float (embeddings, norms, head): float16 or "
            "float32. float16 rounds them in the model too, so the checkpoint reloads exactly."
        ),
    ]


# the pruners, then the training steps that prune (movement, imp)
PRUNE_METHODS = registry.methods("prune")


class Prune:
    """Options of `tinyllm prune`."""

    @staticmethod
    def methods() -> str:
        """Pruners, then the training steps that prune."""
        return _bar(PRUNE_METHODS)

    Method = Annotated[str, typer.Option(help=f"{_bar(PRUNE_METHODS)}.")]
    Sparsity = Annotated[
        float,
        typer.Option(
            help="Fraction removed, in [0, 1): of the weights (magnitude, wanda, sparsegpt, "
            "movement, imp), of each block's FFN channels (channels) or KV groups (heads)."
        ),
    ]
    Pattern = Annotated[
        str | None, typer.Option(help="N:M semi-structured sparsity, e.g. 2:4 (overrides it).")
    ]
    Allocation = Annotated[
        str, typer.Option(help="uniform | owl (outlier-weighted sparsity per block).")
    ]
    Scope = Annotated[str, typer.Option(help="magnitude: layer | row | global.")]
    Count = Annotated[
        int | None, typer.Option(help="heads: KV groups per block; blocks: blocks to remove.")
    ]
    Importance = Annotated[
        str,
        typer.Option(
            help="channels / heads: activation (||a|| * ||W|| on calibration inputs, block by "
            "block) | gradient (first-order Taylor |W * dL/dW| of the LM loss, one backward pass "
            "over the calibration windows; try --samples 32)."
        ),
    ]
    Bits = Annotated[
        int | None, typer.Option(help="sparsegpt: also quantize to this many bits in one pass.")
    ]
    GroupSize = Annotated[int, typer.Option(help="sparsegpt --bits: 32, 64 or 128.")]
    Sym = Annotated[bool, typer.Option("--sym/--asym", help="sparsegpt --bits: grid.")]
    Steps = Annotated[int, typer.Option(help="movement: training steps; imp: steps per round.")]
    Lr = Annotated[float, typer.Option(help="movement / imp: learning rate.")]
    Rounds = Annotated[int, typer.Option(help="imp: prune-retrain rounds.")]
    Rewind = Annotated[
        bool, typer.Option(help="imp: reset surviving weights to the original before retraining.")
    ]


class Distill:
    """Options of `tinyllm distill`."""

    Teacher = Annotated[str, typer.Option(help="Teacher model (any MODEL spec).")]
    Student = Annotated[
        str | None,
        typer.Option(
            help="Student model: any MODEL spec with the teacher's tokenizer, e.g. a quantized "
            "checkpoint (trained through fake quantization, saved packed again) or a pruned one "
            "(masks kept). Default with --layers: the teacher."
        ),
    ]
    Layers = Annotated[
        int | None,
        typer.Option(help="Keep this many evenly spaced blocks of the student (15 of 30: 0,2,..)."),
    ]
    Alpha = Annotated[float, typer.Option(help="Weight of the soft-target KD loss.")]
    Beta = Annotated[float, typer.Option(help="Weight of next-token cross-entropy.")]
    Gamma = Annotated[float, typer.Option(help="Weight of hidden-state matching.")]
    Delta = Annotated[float, typer.Option(help="Weight of attention-map KL (eager attention).")]
    Temperature = Annotated[float, typer.Option(help="Softmax temperature of the KD loss.")]
    Kd = Annotated[str, typer.Option(help="KD divergence: forward | reverse | js.")]
    Feature = Annotated[str, typer.Option(help="Hidden-state distance: mse | cosine.")]
    Steps = Annotated[int, typer.Option(help="Optimizer steps.")]
    Lr = Annotated[float, typer.Option(help="Peak learning rate (AdamW).")]
    ScaleLr = Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of quantization scales (log-scales), norms and biases "
            "(QAT: 3e-3 works where the weights take 1e-4); default --lr."
        ),
    ]
    Warmup = Annotated[float, typer.Option(help="Warmup, fraction of steps (then cosine).")]
    WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay.")]
    Batch = Annotated[int, typer.Option(help="Windows per micro-batch (per process).")]
    SeqLen = Annotated[int, typer.Option(help="Tokens per training window.")]
    GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.")]
    Clip = Annotated[float, typer.Option(help="Gradient-norm clipping.")]
    Seed = Annotated[int, typer.Option(help="Seed of the data order.")]
    Corpus = Annotated[str, typer.Option(help="Corpus (training split; never its eval slice).")]
    TeacherCache = Annotated[
        bool,
        typer.Option(
            help="Cache the teacher's top-k logits and the mass outside them on disk; KD then "
            "runs over the k tokens plus 'any other' (forward KD only)."
        ),
    ]
    Topk = Annotated[int, typer.Option(help="Logits kept per position by --teacher-cache.")]
    EvalEvery = Annotated[int, typer.Option(help="Evaluate every N steps (0: never).")]
    EvalWindows = Annotated[int, typer.Option(help="Windows of the periodic evaluations.")]
    EvalSeqLen = Annotated[int, typer.Option(help="Tokens per evaluation window.")]
    FinalEvalWindows = Annotated[int, typer.Option(help="Windows of the before/after evaluations.")]
    SaveEvery = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
    Resume = Annotated[bool, typer.Option(help="Continue the run in OUTPUT.")]
    Overwrite = Annotated[bool, typer.Option(help="Replace a non-empty OUTPUT.")]
    Train = Annotated[
        str,
        typer.Option(
            help="What trains: all, or scales (QAT of a quantized student: only its quantization "
            "scales, norms and biases; latent weights and embeddings frozen)."
        ),
    ]
