"""Pruning whole tiny models: sparsity reached, tensors that really shrink, sparse checkpoints,
and refusals of bad input."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from tests.test_cli import assert_clean_error, run
from tinyllm.checkpoint import load_checkpoint, save_checkpoint
from tinyllm.errors import ConfigError
from tinyllm.models.sparsity import sparsity_of
from tinyllm.prune.api import prune
from tinyllm.prune.magnitude import Magnitude
from tinyllm.prune.sparsegpt import SparseGPT
from tinyllm.prune.structured import Blocks, Channels, Heads
from tinyllm.prune.wanda import Wanda

CALIB = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "cfg",
    [
        Magnitude(sparsity=0.5),
        Magnitude(sparsity=0.3, scope="row"),
        Magnitude(sparsity=0.5, scope="global"),
        Wanda(sparsity=0.5),
        Wanda(pattern="2:4"),
        SparseGPT(sparsity=0.5),
        SparseGPT(pattern="4:8"),
        Wanda(sparsity=0.5, allocation="owl"),
    ],
    ids=lambda c: f"{type(c).__name__}-{c.pattern or c.sparsity}-{c.allocation}",
)
def test_unstructured_pruners_reach_their_sparsity(cfg) -> None:
    model = tiny_model()
    report = prune(model, cfg, calib=CALIB)
    assert sparsity_of(model) == pytest.approx(cfg.target, abs=0.02)
    assert len(report["layer_sparsity"]) == 2 * 7
    if cfg.allocation == "owl":
        spread = report["owl"]["block_sparsity"]
        assert sum(spread) / len(spread) == pytest.approx(cfg.target, abs=1e-6)


def test_sparse_checkpoint_is_smaller_and_reloads_exactly(tmp_path, tokenizer) -> None:
    model = tiny_model(vocab=len(tokenizer))
    dense = save_checkpoint(model, tokenizer, tmp_path / "dense", {})
    prune(model, Wanda(sparsity=0.5), calib=CALIB)
    from tinyllm.checkpoint import round_floats

    round_floats(model, torch.float16)
    sparse = save_checkpoint(model, tokenizer, tmp_path / "sparse", {})
    size = {p: (p / "model.safetensors").stat().st_size for p in (dense, sparse)}
    linear_bytes = sum(s.numel() * 2 for n, s in model.named_parameters() if "layers" in n)
    assert size[dense] - size[sparse] > 0.35 * linear_bytes  # ~7/16 of the linears' bytes saved
    again, _ = load_checkpoint(sparse)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_channels_heads_blocks_really_shrink(tmp_path, tokenizer) -> None:
    import tinyllm

    model = tiny_model(vocab=len(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    prune(model, Channels(ratio=0.25), calib=CALIB)
    prune(model, Heads(count=1), calib=CALIB)
    assert model.config.intermediate_size == 96
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    layer = model.model.layers[0]
    assert layer.mlp.down_proj.weight.shape == (64, 96)
    assert layer.self_attn.q_proj.weight.shape == (32, 64)
    assert layer.self_attn.k_proj.weight.shape == (16, 64)
    assert sum(p.numel() for p in model.parameters()) < params
    out = save_checkpoint(model, tokenizer, tmp_path / "small", {})
    again, _ = tinyllm.load(out)
    ids = CALIB[:2]
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_channel_pruning_drops_dead_channels_without_changing_outputs(importance) -> None:
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 96:] = 0  # channels 96..127 contribute nothing
    ref = model(CALIB[:2]).logits
    report = prune(model, Channels(ratio=0.25, importance=importance), calib=CALIB)
    assert all(kept == list(range(96)) for kept in report["kept_channels"].values())
    torch.testing.assert_close(model(CALIB[:2]).logits, ref, rtol=1e-5, atol=1e-5)
    # the gradient pass leaves no gradients behind and every parameter trainable again
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("importance", ["activation", "gradient"])
def test_head_pruning_drops_a_dead_kv_group_without_changing_outputs(importance) -> None:
    model = tiny_model()  # 4 query heads of 16 dims sharing 2 KV groups
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, :32] = 0  # query heads 0, 1 (group 0) are unused
    ref = model(CALIB[:2]).logits
    report = prune(model, Heads(count=1, importance=importance), calib=CALIB)
    assert all(kept == [1] for kept in report["kept_kv_groups"].values())
    torch.testing.assert_close(model(CALIB[:2]).logits, ref, rtol=1e-5, atol=1e-5)


def test_gradient_importance_is_the_first_order_taylor_term() -> None:
    from tinyllm.prune.structured import taylor, taylor_importance

    model = tiny_model()
    taylor_importance(model, CALIB, batch_size=3)  # batches of 3, 3, 2 windows
    down = model.model.layers[0].mlp.down_proj
    got = taylor(down)
    model.zero_grad(set_to_none=True)
    ids = CALIB
    logits = model(input_ids=ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    (grad,) = torch.autograd.grad(loss * ids[:, 1:].numel() / ids.numel(), down.weight)
    torch.testing.assert_close(got, (down.weight * grad).abs().detach(), rtol=1e-4, atol=1e-7)


def test_block_pruning_removes_the_block_that_changes_least() -> None:
    model = tiny_model()
    layer = model.model.layers[1]
    with torch.no_grad():  # block 1 becomes the identity
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ref = model(CALIB[:2]).logits
    report = prune(model, Blocks(count=1), calib=CALIB)
    assert report["dropped_blocks"] == [1] and model.config.num_hidden_layers == 1
    torch.testing.assert_close(model(CALIB[:2]).logits, ref, rtol=1e-5, atol=1e-5)


def test_block_influence_is_one_minus_the_cosine_of_each_blocks_input_and_output() -> None:
    """Measured in one pass (each block's outputs feed the next): equal to 1 - cos(in, out) of the
    dense model's own forward, caught with hooks, for every block."""
    model = tiny_model()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, out[0] if isinstance(out, tuple) else out))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in model.model.layers]
    with torch.no_grad():
        model(CALIB)
    for h in handles:
        h.remove()
    want = [float(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()) for x, y in seen]
    report = prune(model, Blocks(count=1), calib=CALIB, batch_size=len(CALIB))
    assert report["block_influence"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_bad_structured_requests_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least one must stay"):
        prune(tiny_model(), Heads(count=2), calib=CALIB)
    with pytest.raises(ConfigError, match="one must stay"):
        prune(tiny_model(), Blocks(count=2), calib=CALIB)
    with pytest.raises(ConfigError, match="rounds to none"):
        prune(tiny_model(), Heads(ratio=0.1), calib=CALIB)
    with pytest.raises(ConfigError, match="does not divide"):
        prune(tiny_model(), Wanda(pattern="3:5"), calib=CALIB)
    with pytest.raises(ConfigError, match="would leave no FFN channel"):  # an empty FFN
        prune(tiny_model(), Channels(ratio=0.999), calib=CALIB)


def test_quantized_model_is_refused() -> None:
    import tinyllm

    model = tiny_model()
    tinyllm.quantize(model, tinyllm.RTN(bits=4, group_size=32))
    with pytest.raises(ConfigError, match="prune the float model first"):
        prune(model, Magnitude(sparsity=0.5))


def test_cli_prune_and_eval_report_sparsity(tiny_dir, corpus_file, tmp_path) -> None:
    import json

    out = tmp_path / "pruned"
    p = run("prune", str(tiny_dir), "--method", "magnitude", "--sparsity", "0.5", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "sparsity 50.0%" in p.stdout
    res = tmp_path / "r.json"
    p = run(
        "eval",
        str(out),
        "--seq-len",
        "16",
        "--windows",
        "2",
        "--corpus",
        str(corpus_file),
        "--json",
        str(res),
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(res.read_text())["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert_clean_error(
        run("prune", str(tiny_dir), "--sparsity", "1.0", "-o", str(tmp_path / "x")), "sparsity"
    )
    assert_clean_error(
        run("prune", str(tiny_dir), "--method", "blocks", "-o", str(tmp_path / "y")), "--count"
    )


def test_structured_model_exports_to_transformers(tmp_path, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from tinyllm.export import export

    model = tiny_model(vocab=len(tokenizer))
    prune(model, Channels(ratio=0.25), calib=CALIB)
    prune(model, Heads(count=1), calib=CALIB)
    prune(model, Blocks(count=1), calib=CALIB)
    export(model, tokenizer, tmp_path / "hf", "hf")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert again.config.num_hidden_layers == 1 and again.config.intermediate_size == 96
    with torch.no_grad():
        torch.testing.assert_close(
            again(CALIB[:2]).logits, model(CALIB[:2]).logits, rtol=1e-2, atol=1e-2
        )
