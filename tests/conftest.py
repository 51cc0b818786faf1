"""Shared fixtures: tiny random models of several families, a tiny tokenizer, small corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TINYLLM_PROGRESS", "0")

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "A wizard's job is to vex chumps quickly in fog. Sphinx of black quartz, judge my vow. "
) * 40


def tiny_config(family: str, vocab: int = 320):
    """A two-block random config of a family, small enough for a test to run in milliseconds."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    common.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "opt":
        return tf.OPTConfig(
            **common, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256
        )
    common.update(intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gemma3":
        # query_pre_attn_scalar = head_dim, as in the released Gemma 3 models
        return tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=32, query_pre_attn_scalar=16
        )
    cls = {
        "llama": tf.LlamaConfig,
        "qwen2": tf.Qwen2Config,
        "mistral": tf.MistralConfig,
        "phi3": tf.Phi3Config,
    }[family]
    return cls(**common)


FAMILIES = ["llama", "qwen2", "mistral", "gemma3", "phi3", "opt"]


def tiny_model(family: str = "llama", vocab: int = 320, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab)).eval()


def tiny_tokenizer(vocab: int = 320, text: str = TEXT):
    """A byte-level BPE tokenizer trained on `text`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 4, encoding="utf-8")
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path, tokenizer) -> Path:
    """A Hugging Face checkpoint directory of a tiny Llama with its tokenizer."""
    out = tmp_path / "tiny-llama"
    tiny_model("llama", vocab=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Unit tests get a private cache; real-model tests (marked slow) share the user's cache."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("TINYLLM_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def teacher_dir(tmp_path: Path, tokenizer) -> Path:
    """A four-block tiny Llama with its tokenizer."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama", vocab=len(tokenizer))
    cfg.num_hidden_layers = 4
    cfg.initializer_range = 0.3  # a teacher with opinions: dropping blocks costs something
    torch.manual_seed(0)
    out = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(TEXT * 8, encoding="utf-8")
    return path
