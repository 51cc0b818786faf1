"""Students: layer-dropped copies of the teacher, checks that a student fits its teacher, and
the preparation that lets a compressed student train without losing its compression.

- `layer_dropped(teacher, n)` keeps n evenly spaced blocks (DistilBERT-style: the student starts
  from the teacher's own weights), found from the module graph, and rewrites the config.
- `check_pair` refuses a student with another tokenizer or vocabulary.
- `prepare_for_training` swaps packed QuantLinear layers for fake-quant ones (QAT) and fixes the
  masks of pruned layers; `finish_training` packs the quantized layers again.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from tinyllm.errors import ConfigError, TokenizerMismatchError
from tinyllm.models.anatomy import find_blocks
from tinyllm.models.sparsity import SPARSE_MIN
from tinyllm.models.surgery import keep_blocks
from tinyllm.quant.qat import to_fake_quant, to_quant

log = logging.getLogger(__name__)


def kept_blocks(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher blocks, first one included: 15 of 30 keeps 0, 2, ..., 28."""
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(
            f"--layers must be between 1 and the teacher's {teacher_layers} blocks, "
            f"got {student_layers}"
        )
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def layer_dropped(teacher: nn.Module, layers: int) -> nn.Module:
    """A copy of `teacher` keeping `layers` evenly spaced decoder blocks."""
    keep = kept_blocks(len(find_blocks(teacher)[1]), layers)
    student = copy.deepcopy(teacher)
    keep_blocks(student, keep)
    log.info("student keeps teacher blocks %s", keep)
    return student


def check_pair(teacher: nn.Module, t_tok: object, student: nn.Module, s_tok: object) -> None:
    """A student must predict over the teacher's vocabulary, token for token."""
    if t_tok.get_vocab() != s_tok.get_vocab():
        raise TokenizerMismatchError(
            "the student's tokenizer differs from the teacher's: distillation compares their "
            "predictions token by token, so both must use the same tokenizer"
        )
    tv = teacher.get_output_embeddings().weight.shape[0]
    sv = student.get_output_embeddings().weight.shape[0]
    if tv != sv:
        raise TokenizerMismatchError(
            f"the student predicts over {sv} tokens and the teacher over {tv}: they need the same "
            "vocabulary"
        )


class Masks:
    """Fixed sparsity masks of pruned float linears: gradients and weights stay zero there."""

    def __init__(self, model: nn.Module) -> None:
        self.masks: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
        _, blocks = find_blocks(model)
        for bi, block in enumerate(blocks):
            for name, mod in block.named_modules():
                if not isinstance(mod, nn.Linear):
                    continue
                mask = mod.weight.detach() != 0
                if 1 - mask.float().mean() >= SPARSE_MIN:
                    key = f"{bi}.{name}"
                    self.masks[key] = (mod.weight, mask)
                    mod.weight.register_hook(lambda g, k=key: g * self.masks[k][1])

    def __len__(self) -> int:
        return len(self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self.masks.values():
            weight.mul_(mask)

    def after_step(self, _trainer: object) -> None:
        self.apply()

    def to(self, device: torch.device) -> None:
        """Keep the masks where their weights train."""
        self.masks = {k: (w, m.to(device)) for k, (w, m) in self.masks.items()}


def scale_like(name: str, p: nn.Parameter) -> bool:
    """A quantization scale (a fake-quant layer's log-scale) or a 1-D parameter (norm, bias): what
    `train="scales"` trains and `scale_lr` addresses."""
    return p.ndim == 1 or name.endswith("log_scale")


def prepare_for_training(student: nn.Module, train: str = "all") -> tuple[list[str], Masks]:
    """Make the parameters trainable; packed layers become fake-quant (QAT); pruned layers keep
    their masks. `train="scales"` (QAT only) trains just the quantization scales and the 1-D
    parameters (norms, biases): the latent weights and embeddings stay frozen.
    -> (names of the fake-quant layers, the masks)"""
    if any(getattr(m, "is_tinyllm_embedding", False) for m in student.modules()):
        raise ConfigError(
            "training a model with quantized embeddings is not supported: quantize the "
            "embeddings after training (in a recipe, make the embeddings stage the last one)"
        )
    fake = to_fake_quant(student)
    if train == "scales" and not fake:
        raise ConfigError(
            "train: scales trains the quantization scales of a quantized student, and this "
            "student has no quantized layers; use train: all (the default)"
        )
    for name, p in student.named_parameters():
        p.requires_grad_(train == "all" or scale_like(name, p))
    masks = Masks(student)
    if fake:
        what = "their scales only" if train == "scales" else "fake quantization"
        log.info("QAT: %d quantized layers train through %s", len(fake), what)
    if len(masks):
        log.info("%d pruned layers keep their masks", len(masks))
    return fake, masks


def finish_training(student: nn.Module) -> None:
    """Pack the fake-quant layers back into QuantLinear records; freeze everything."""
    to_quant(student)
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
