"""`tinyllm export`: GGUF, ONNX or a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tinyllm.cli._common import (
    CalibCorpusOpt,
    ModelArg,
    OverwriteOpt,
    SamplesOpt,
    SeqLenOpt,
    help_text,
    out,
)
from tinyllm.cli.app import app
from tinyllm.errors import ConfigError

EXPORT_HELP = """Export a model (original or compressed) for another runtime.

--format hf writes a directory transformers' AutoModelForCausalLM.from_pretrained loads:
float models as plain safetensors, quantized ones in the compressed-tensors pack-quantized
format (needs `pip install compressed-tensors` to write and to load).

GGUF files load in llama.cpp (llama-cli, llama-server, llama-cpp-python). A tinyllm checkpoint
quantized on a grid a GGUF block type holds (4-bit symmetric, groups of 32 or a multiple ->
q4_0; 4-bit -> q4_1; 5-bit -> q5_0/q5_1; 8-bit symmetric -> q8_0) keeps its exact integers
and scales; other layers are re-quantized with a warning (or refused with --strict).
`tinyllm quantize ... --gguf-compatible q4_0` makes GPTQ/AWQ produce such a grid;
`--gguf-compatible q4_k` (q2_k..q6_k) a K-quant super-block grid that --type q4_k carries.

--type mix --target-bpw B writes a float model as a per-tensor mix of GGUF types chosen by
measurement (where llama.cpp's _S/_M/_L mixes choose by rule): each block linear's KL
divergence is measured in every type that tiles it (q2_k..q6_k, q4_0, iq4_nl, q5_0, q8_0), the types
minimising the summed KL within B bits per weight are picked, and GPTQ quantizes each layer on
its type's grid from --samples calibration windows. It is `tinyllm quantize --method mixed
--base gptq --target-bpw B` followed by `--type auto`, in one command (minutes, not seconds).

--format onnx writes a decoder graph with KV-cache inputs and outputs (Llama, Mistral, Qwen2)
for onnxruntime, weights in FILE.data beside it; --type q4/q8 carries 4/8-bit layers as
MatMulNBits with their integers.

Examples:

  tinyllm export smollm2-135m --type f16 -o smollm2-f16.gguf

  tinyllm quantize smollm2-135m --method gptq --gguf-compatible q4_0 -o out/gptq-q4_0
  tinyllm export out/gptq-q4_0 --type q4_0 --strict -o smollm2-gptq-q4_0.gguf
  tinyllm quantize smollm2-135m --method gptq --gguf-compatible q4_k -o out/gptq-q4_k
  tinyllm export out/gptq-q4_k --type q4_k --strict -o smollm2-gptq-q4_k.gguf

  tinyllm export smollm2-135m --type mix --target-bpw 5.0 -o smollm2-mix.gguf

  tinyllm export out/gptq-q4_0 --format hf -o out/gptq-q4_0-hf

  tinyllm export out/gptq-q4_0 --format onnx --type q4 -o smollm2-q4.onnx

A model too big to load whole (an 8B checkpoint on a 16 GB machine) is exported to GGUF one
decoder block at a time (--stream auto picks it; docs/streaming.md).
"""

FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        help="gguf (llama.cpp), onnx (onnxruntime, with KV-cache inputs/outputs) or hf (a "
        "Hugging Face directory; quantized layers in the compressed-tensors pack-quantized "
        "format).",
    ),
]
TypeOpt = Annotated[
    str | None,
    typer.Option(
        "--type",
        help="GGUF: type of the block linears, f32, f16 (default), bf16, q8_0, q4_0, q4_1, "
        "q5_0, q5_1, iq4_nl, iq4_xs, or a K-quant q2_k, q3_k, q4_k, q5_k, q6_k (tensors whose "
        "rows are not a multiple of 256 take llama.cpp's fallback: q5_0, q5_1, q8_0, q4_0 for "
        "q2_k/q3_k, iq4_nl for iq4_xs), "
        "or auto: each quantized layer in the type its own grid carries into (a mixed-precision "
        "checkpoint keeps every layer's width), or mix: a type per block linear chosen by "
        "measured KL under --target-bpw (float models; runs GPTQ). "
        "ONNX: fp32 (default), q4 or q8 (quantized layers as MatMulNBits), "
        "w8a8 (int8-static/-dynamic and smoothquant layers as QuantizeLinear + "
        "MatMulInteger). hf: none (layers are written as they are). "
        "Quantized layers on a matching grid are carried bit for bit.",
    ),
]
EmbedTypeOpt = Annotated[
    str | None,
    typer.Option(
        help="GGUF only: type of the embedding/head (default: the --type if float, else q8_0)."
    ),
]


@app.command(help=help_text(EXPORT_HELP))
def export(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (gguf, onnx) or directory (hf).")
    ],
    format: FormatOpt = "gguf",
    type: TypeOpt = None,
    embed_type: EmbedTypeOpt = None,
    strict: Annotated[
        bool, typer.Option(help="Refuse instead of re-quantizing a layer that cannot be carried.")
    ] = False,
    overwrite: OverwriteOpt = False,
    target_bpw: Annotated[
        float | None,
        typer.Option(
            help="--type mix: GGUF bits per weight of the block linears, scales and mins "
            "included (Q4_K 4.5, Q5_0 5.5, Q6_K 6.56, Q8_0 8.5), e.g. 5.0."
        ),
    ] = None,
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 512,
    calib_corpus: CalibCorpusOpt = "enwiki",
    stream: Annotated[
        str,
        typer.Option(
            help="GGUF: on reads the model one decoder block at a time (memory: the embedding "
            "table, the head and one block), off loads it whole, auto streams a model whose "
            "float32 tensors would not fit (what `tinyllm generate` loads narrow). The file is "
            "the same either way. Not with --type mix.",
        ),
    ] = "auto",
) -> None:
    from tinyllm.export import check_output, export_model, summary
    from tinyllm.export import export as run_export

    check_output(output, format, overwrite)  # fail before loading
    if type == "mix" or target_bpw is not None:
        if stream == "on":
            raise ConfigError("--type mix quantizes the model in memory; drop --stream on")
        m, tok = _mix(model, format, target_bpw, (calib_corpus, samples, seq_len))
        report = run_export(
            m, tok, output, format, "auto", overwrite, strict, embed_type=embed_type
        )
    else:
        report = export_model(
            model, output, format, type, overwrite, strict, stream, embed_type=embed_type
        )
    out.print(summary(output, format, report))


def _mix(model: str, fmt: str, target_bpw: float | None, calib: tuple[str, int, int]):
    """--type mix: a float model quantized by GPTQ onto a GGUF type per block linear chosen by
    measured KL under the budget (quant/mixed.py), in memory, for --type auto to write."""
    from pydantic import ValidationError

    from tinyllm.checkpoint import TINYLLM_CONFIG
    from tinyllm.core.compress import Calibration, compress
    from tinyllm.quant.gptq import GPTQ
    from tinyllm.quant.mixed import DEFAULT_TYPES, Mixed

    if fmt != "gguf":
        raise ConfigError(f"--type mix is a GGUF per-tensor type mix; drop it for --format {fmt}")
    if target_bpw is None:
        raise ConfigError(
            "--type mix needs --target-bpw: GGUF bits per weight of the block linears, e.g. 5.0 "
            "(about Q4_K_M's size; 4.0 about Q3_K_M's, 6.0 about Q5_K_M's)"
        )
    info = Path(model) / TINYLLM_CONFIG
    if info.is_file() and json.loads(info.read_text()).get("quantized"):
        raise ConfigError(
            f"{model} is already quantized: --type mix chooses types for a float model; export "
            "this checkpoint with --type auto (each layer in the type its grid carries into)"
        )
    try:
        step = Mixed(base=GPTQ(), types=list(DEFAULT_TYPES), target_bpw=target_bpw)
        corpus, samples, seq_len = calib
        calibration = Calibration(corpus=corpus, samples=samples, seq_len=seq_len)
    except ValidationError as exc:
        raise ConfigError(f"--type mix: {exc.errors()[0]['msg']}") from None
    out.print(f"--type mix: each block linear's KL per GGUF type, then GPTQ ({samples} windows)")
    result = compress(model, [step], calibration)
    chosen = _counts(result.report["bit_allocation"])
    out.print(f"  chose {chosen} at {result.report['bpw']:.3f} bits per weight")
    return result.model, result.tokenizer


def _counts(allocation: dict[str, str]) -> str:
    from collections import Counter

    return ", ".join(f"{n} {t}" for t, n in sorted(Counter(allocation.values()).items()))
