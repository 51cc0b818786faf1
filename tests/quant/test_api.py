"""quant.api builds steps from flat (CLI) options."""

from __future__ import annotations

import pytest

from tinyllm.errors import ConfigError
from tinyllm.quant.api import quant_step, step_fields


def test_nf4_takes_group_size_as_its_block_size():
    """`tinyllm quantize --method nf4 --group-size 128` sets NF4's blocks (it was once ignored)."""
    assert "group_size" in step_fields("nf4")
    assert quant_step("nf4", {"group_size": 128}).block_size == 128
    assert quant_step("nf4", {}).block_size == 64
    with pytest.raises(ConfigError, match="block_size must be 32, 64 or 128"):
        quant_step("nf4", {"group_size": 48})


def test_an_option_of_another_method_is_not_a_field():
    assert "damp" not in step_fields("rtn") and "damp" in step_fields("gptq")
    assert "damp" in step_fields("awq", base="gptq") and "damp" not in step_fields("awq")
