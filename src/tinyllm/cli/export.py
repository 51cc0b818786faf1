"""`tinyllm export`: GGUF, ONNX or a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tinyllm.cli._common import (
    ModelArg,
    human_bytes,
    out,
)
from tinyllm.cli.app import app


@app.command()
def export(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Output file (gguf, onnx) or directory (hf).")
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="gguf (llama.cpp), onnx (onnxruntime, with KV-cache inputs/outputs) or hf (a "
            "Hugging Face directory; quantized layers in the compressed-tensors pack-quantized "
            "format).",
        ),
    ] = "gguf",
    type: Annotated[
        str | None,
        typer.Option(
            "--type",
            help="GGUF: type of the block linears, f32, f16 (default), bf16, q8_0, q4_0, q4_1, "
            "q5_0, q5_1. ONNX: fp32 (default), q4 or q8 (quantized layers as MatMulNBits), "
            "w8a8 (int8-static/-dynamic and smoothquant layers as QuantizeLinear + "
            "MatMulInteger). "
            "Quantized layers on a matching grid are carried bit for bit.",
        ),
    ] = None,
    embed_type: Annotated[
        str | None,
        typer.Option(help="Type of the embedding/head (default: the --type if float, else q8_0)."),
    ] = None,
    strict: Annotated[
        bool, typer.Option(help="Refuse instead of re-quantizing a layer that cannot be carried.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace an existing output (an hf directory only if tinyllm wrote it)."),
    ] = False,
) -> None:
    """Export a model (original or compressed) for another runtime.

    --format hf writes a directory transformers' AutoModelForCausalLM.from_pretrained loads:
    float models as plain safetensors, quantized ones in the compressed-tensors pack-quantized
    format (needs `pip install compressed-tensors` to write and to load).

    GGUF files load in llama.cpp (llama-cli, llama-server, llama-cpp-python). A tinyllm checkpoint
    quantized on a grid a GGUF block type holds (4-bit symmetric, groups of 32 or a multiple ->
    q4_0; 4-bit -> q4_1; 5-bit -> q5_0/q5_1; 8-bit symmetric -> q8_0) keeps its exact integers
    and scales; other layers are re-quantized with a warning (or refused with --strict).
    `tinyllm quantize ... --gguf-compatible q4_0` makes GPTQ/AWQ produce such a grid.

    --format onnx writes a decoder graph with KV-cache inputs and outputs (Llama, Mistral, Qwen2)
    for onnxruntime, weights in FILE.data beside it; --type q4/q8 carries 4/8-bit layers as
    MatMulNBits with their integers.

    Examples:

      tinyllm export smollm2-135m --type f16 -o smollm2-f16.gguf

      tinyllm quantize smollm2-135m --method gptq --gguf-compatible q4_0 -o out/gptq-q4_0
      tinyllm export out/gptq-q4_0 --type q4_0 --strict -o smollm2-gptq-q4_0.gguf

      tinyllm export out/gptq-q4_0 --format hf -o out/gptq-q4_0-hf

      tinyllm export out/gptq-q4_0 --format onnx --type q4 -o smollm2-q4.onnx
    """
    from tinyllm.core.load import load
    from tinyllm.export import DEFAULT_TYPES, check_output
    from tinyllm.export import export as run_export
    from tinyllm.util.fs import dir_size

    check_output(output, format, overwrite)  # fail before loading
    type = type or DEFAULT_TYPES.get(format)
    m, tok = load(model)
    report = run_export(
        m, tok, output, format, type, overwrite=overwrite, strict=strict, embed_type=embed_type
    )
    if format == "hf":
        out.print(
            f"wrote {output} ({human_bytes(dir_size(output))}): {len(report['packed'])} layers "
            f"packed, {len(report['dequantized'])} written as float"
        )
        return
    if format == "onnx":
        size = output.stat().st_size + output.with_name(output.name + ".data").stat().st_size
        out.print(
            f"wrote {output} (+ .data, {human_bytes(size)}): {len(report.nbits)} layers as "
            f"MatMulNBits, {len(report.float_layers)} quantized layers as float"
        )
        return
    out.print(
        f"wrote {output} ({human_bytes(output.stat().st_size)}): "
        f"{len(report.carried)} layers carried, {len(report.requantized)} re-quantized"
    )
