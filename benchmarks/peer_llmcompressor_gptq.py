"""llm-compressor's GPTQ (W4A16, group 128) on a local model and fixed calibration token ids.

Run by benchmarks/bench_peer_gptq.py with the peer environment's interpreter (llm-compressor
lives in its own virtual environment, not in the project's .venv):

    /work/peer-venv/bin/python benchmarks/peer_llmcompressor_gptq.py MODEL_DIR WINDOWS.pt OUT_DIR \
        --info INFO.json

WINDOWS.pt holds a [samples, seq_len] int64 tensor of token ids (the windows tinyllm calibrates
on); they are given to `oneshot` as a pre-tokenized dataset (input_ids, attention_mask of ones),
in order, unshuffled, untruncated. The model is loaded from MODEL_DIR whole, in its stored
dtype (`AutoModelForCausalLM.from_pretrained(dtype="auto")`, as llm-compressor's README does),
calibrated with llm-compressor's default pipeline on the CPU (no accelerator here) and saved
compressed to OUT_DIR, so the measured run includes loading and writing, as `tinyllm quantize`
does. INFO.json gets the versions, the
calibration shape and the seconds of the load, the oneshot call and the save.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch


def dataset_of(ids: torch.Tensor):  # -> datasets.Dataset
    """A pre-tokenized calibration dataset: one row per window."""
    from datasets import Dataset

    rows = ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("windows", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--info", type=Path, required=True)
    args = p.parse_args()

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.windows)  # [samples, seq_len]
    samples, seq_len = ids.shape
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    t_load = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset_of(ids),
        recipe=recipe,
        max_seq_length=seq_len,
        num_calibration_samples=samples,
        shuffle_calibration_samples=False,
    )
    t1 = time.perf_counter()
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    t2 = time.perf_counter()
    info = {
        "versions": {
            name: version(name)
            for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")
        },
        "samples": samples,
        "seq_len": seq_len,
        "model_dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(t0 - t_load, 1),
        "oneshot_seconds": round(t1 - t0, 1),
        "save_seconds": round(t2 - t1, 1),
        "checkpoint_bytes": sum(f.stat().st_size for f in args.out.glob("*.safetensors")),
    }
    args.info.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
