"""What the real-model export tests share: prompts and our own greedy continuation."""

import torch

PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The three primary colours are",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def our_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from the transformers model (no stop at end-of-text)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0, len(ids) :].tolist()
