"""Score an exported file through the runtime that reads it: what ships is what is gated.

`open_backend` gives the file as a `LanguageModel` (GGUF through llama.cpp, ONNX through
onnxruntime, an `hf` directory through transformers), or raises `NotScoredError` saying why it
cannot (the runtime is not installed, or cannot read the file). `score_windows` computes
perplexity, KL divergence from and top-1 agreement with a reference model on the evaluation
windows, with the formulas `tinyllm eval` uses; `eval.tasks.run_tasks` takes the backend for the
task accuracies.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinyllm.errors import TinyLLMError
from tinyllm.eval.divergence import token_kl, top1_agree
from tinyllm.eval.lm import LogitsLM
from tinyllm.eval.perplexity import perplexity, token_nll
from tinyllm.util.device import module_device

RUNTIMES = {"gguf": "llama.cpp", "onnx": "onnxruntime", "hf": "transformers"}
PACKAGES = {"gguf": ("llama_cpp", "llama-cpp-python"), "onnx": ("onnxruntime", "onnxruntime")}


class NotScoredError(TinyLLMError):
    """An exported file cannot be scored here; the message says why."""


def open_backend(fmt: str, path: Path, tokenizer: Any) -> LogitsLM:
    """The exported file at `path` as a LanguageModel run by its format's runtime."""
    module, package = PACKAGES.get(fmt, (None, None))
    if module and importlib.util.find_spec(module) is None:
        raise NotScoredError(f"{RUNTIMES[fmt]} is not installed (pip install {package})")
    name = f"{Path(path).name} ({RUNTIMES.get(fmt, fmt)})"
    try:
        return _open(fmt, Path(path), tokenizer, name)
    except NotScoredError:
        raise
    except Exception as exc:  # a runtime that cannot read the file: recorded, not fatal
        raise NotScoredError(
            f"{RUNTIMES.get(fmt, fmt)} cannot read {Path(path).name}: {exc}"
        ) from exc


def _open(fmt: str, path: Path, tokenizer: Any, name: str) -> LogitsLM:
    if fmt == "gguf":
        from tinyllm.export.llamacpp import LlamaCppLM

        return LlamaCppLM(path, tokenizer, name)
    if fmt == "onnx":
        from tinyllm.export.onnxrt import OnnxLM

        return OnnxLM(path, tokenizer, name)
    if fmt == "hf":
        from transformers import AutoModelForCausalLM

        from tinyllm.eval.lm import ModuleLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return ModuleLM(model, tokenizer, name)
    raise NotScoredError(f"no runtime scores the {fmt} format")


@torch.inference_mode()
def score_windows(lm: LogitsLM, windows: torch.Tensor, reference: nn.Module) -> dict[str, Any]:
    """Perplexity of `lm` on windows [W, L], and its KLD from and top-1 agreement with
    `reference` (on its device) at the same positions. -> {"perplexity", "kld",
    "top1_agreement", "tokens", "eval_seconds"} (seconds: the backend's forwards only)."""
    reference.eval()
    device = module_device(reference)
    per_batch = max(1, lm.tokens_per_batch // windows.shape[1])
    nll, kl, agree, seconds = 0.0, 0.0, 0, 0.0
    for start in range(0, windows.shape[0], per_batch):
        batch = windows[start : start + per_batch]  # [B, L]
        t0 = time.perf_counter()
        rows = lm.tail_logits(batch.tolist(), [0] * batch.shape[0])
        seconds += time.perf_counter() - t0
        z = torch.stack(rows)[:, :-1]  # [B, L-1, V] predicts batch[:, 1:]
        ref = reference(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float().cpu()
        nll += float(token_nll(z, batch[:, 1:]).double().sum())
        kl += float(token_kl(ref, z).double().sum())
        agree += int(top1_agree(ref, z).sum())
    tokens = windows[:, 1:].numel()
    return {
        "perplexity": perplexity(nll, tokens),
        "kld": kl / tokens,
        "top1_agreement": agree / tokens,
        "tokens": tokens,
        "eval_seconds": seconds,
    }
