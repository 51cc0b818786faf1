"""What the real-model export tests share: prompts and our own greedy continuation."""

import torch

PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):",
    "The three primary colours are",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


@torch.no_grad()
def our_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens from the transformers model with its KV cache; end-of-text is a token like
    any other (generate's min_new_tokens would forbid it)."""
    from transformers import DynamicCache

    cache, x, out = DynamicCache(), torch.tensor([ids]), []
    for _ in range(n):
        logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits
        out.append(int(logits[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    return out
