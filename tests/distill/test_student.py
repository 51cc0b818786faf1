"""Students: layer dropping, tokenizer checks, fixed masks, and fake quantization for QAT."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import tiny_model, tiny_tokenizer
from tinyllm.distill.student import Masks, check_pair, layer_dropped, prepare_for_training
from tinyllm.errors import ConfigError, TokenizerMismatchError
from tinyllm.kernels.qlinear import QuantLinear, replace_linear
from tinyllm.quant.gptq import GPTQ, gptq_quantize
from tinyllm.quant.nf4 import NF4, nf4_quantize
from tinyllm.quant.qat import FakeQuantLinear, to_fake_quant, to_quant
from tinyllm.quant.rtn import RTN, rtn_quantize


def _four_block(family: str = "llama"):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config(family)
    cfg.num_hidden_layers = 4
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_layer_dropped_keeps_evenly_spaced_teacher_blocks() -> None:
    teacher = _four_block()
    student = layer_dropped(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for s_block, t_index in zip(student.model.layers, (0, 2), strict=True):
        t_block = teacher.model.layers[t_index]
        assert torch.equal(s_block.mlp.up_proj.weight, t_block.mlp.up_proj.weight)
        assert s_block.mlp.up_proj.weight is not t_block.mlp.up_proj.weight  # a copy
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    ids = torch.randint(0, 320, (1, 12))
    assert student(ids).logits.shape == (1, 12, 320)
    # the student reloads from its rewritten config
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_config(student.config)
    again.load_state_dict(student.state_dict())


def test_layer_dropped_slices_layer_types() -> None:
    student = layer_dropped(_four_block("gemma3"), 2)
    assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    student(torch.randint(0, 320, (1, 40)))


def test_more_student_layers_than_teacher_is_refused() -> None:
    with pytest.raises(ConfigError, match="between 1 and the teacher's 4"):
        layer_dropped(_four_block(), 5)


def test_student_with_another_tokenizer_or_vocabulary_is_refused(tokenizer) -> None:
    other = tiny_tokenizer(text="completely different words " * 50)
    with pytest.raises(TokenizerMismatchError, match="tokenizer"):
        check_pair(tiny_model(), tokenizer, tiny_model(), other)
    with pytest.raises(TokenizerMismatchError, match="same vocabulary"):
        check_pair(tiny_model(vocab=320), tokenizer, tiny_model(vocab=352), tokenizer)


def test_masks_keep_pruned_weights_at_zero() -> None:
    model = tiny_model()
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    masks = Masks(model)
    assert len(masks) == 1
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randint(0, 320, (2, 8))).logits.sum().backward()
    opt.step()
    masks.apply()
    assert bool((layer.weight[:, ::2] == 0).all()) and bool((layer.weight[:, 1::2] != 0).all())


def _records():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = torch.randn(256, 64)
    gptq, _ = gptq_quantize(
        w, 2 * x.t() @ x, GPTQ(bits=3, group_size=32, act_order=True, static_groups=False)
    )
    return {
        "rtn4-sym": rtn_quantize(w, RTN(bits=4, group_size=32, sym=True)),
        "rtn3-asym-pc": rtn_quantize(w, RTN(bits=3, group_size=-1, sym=False)),
        "gptq3-perm": gptq,
        "nf4-dq": nf4_quantize(w, NF4(block_size=32)),
    }


@pytest.mark.parametrize("kind", ["rtn4-sym", "rtn3-asym-pc", "gptq3-perm", "nf4-dq"])
def test_fake_quant_matches_record_and_round_trips(kind: str) -> None:
    qw = _records()[kind]
    fq = FakeQuantLinear(qw)
    torch.testing.assert_close(fq.quantized_weight(), qw.dequantize(), rtol=0, atol=1e-5)
    back = fq.to_record()  # untouched weights: the same integers and scales
    assert torch.equal(back.codes(), qw.codes())
    torch.testing.assert_close(back.scale.float(), qw.scale.float())
    assert (back.bits, back.group_size, back.sym) == (qw.bits, qw.group_size, qw.sym)


def test_fake_quant_passes_gradients_to_weights_and_scales() -> None:
    fq = FakeQuantLinear(_records()["rtn4-sym"])
    fq(torch.randn(5, 64)).pow(2).sum().backward()
    assert fq.weight.grad is not None and fq.weight.grad.abs().sum() > 0
    assert fq.log_scale.grad is not None and fq.log_scale.grad.abs().sum() > 0


def test_trained_fake_quant_packs_to_what_it_computes() -> None:
    fq = FakeQuantLinear(_records()["gptq3-perm"])
    with torch.no_grad():
        fq.weight.add_(0.05 * torch.randn_like(fq.weight))
        fq.log_scale.add_(math.log(1.03))
    x = torch.randn(4, 64)
    packed = QuantLinear(fq.to_record())
    torch.testing.assert_close(packed(x), fq(x), rtol=1e-5, atol=1e-5)


def test_prepare_swaps_quantized_layers_and_back() -> None:
    model = tiny_model()
    name = "model.layers.1.self_attn.q_proj"
    w = model.get_submodule(name).weight.detach()
    replace_linear(model, name, rtn_quantize(w, RTN(bits=4, group_size=32, sym=True)))
    fake, masks = prepare_for_training(model)
    assert fake == [name] and len(masks) == 0
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.get_submodule(name), FakeQuantLinear)
    assert to_quant(model) == [name] and isinstance(model.get_submodule(name), QuantLinear)
    assert to_fake_quant(model) == [name]


def test_prepare_scales_only_freezes_weights_and_needs_a_quantized_student() -> None:
    model = tiny_model()
    name = "model.layers.1.self_attn.q_proj"
    w = model.get_submodule(name).weight.detach()
    replace_linear(model, name, rtn_quantize(w, RTN(bits=4, group_size=32, sym=True)))
    prepare_for_training(model, "scales")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert f"{name}.log_scale" in trainable
    assert f"{name}.weight" not in trainable
    assert "model.embed_tokens.weight" not in trainable
    assert "model.layers.0.mlp.up_proj.weight" not in trainable
    assert "model.norm.weight" in trainable and "model.layers.0.input_layernorm.weight" in trainable
    # a float student has no scales to train: a clear error, not a run that trains only norms
    with pytest.raises(ConfigError, match="no quantized layers"):
        prepare_for_training(tiny_model(), "scales")
