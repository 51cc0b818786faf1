"""Task parity on a real model: SmolLM2-135M on `polarity` through tinyllm's harness, through
lm-eval's runner with the tinyllm model, and through lm-eval's own Hugging Face model (slow)."""

import pytest

from tinyllm.core.load import load
from tinyllm.data.tasks import builtin_task
from tinyllm.eval import lmeval
from tinyllm.eval.lm import ModuleLM
from tinyllm.eval.tasks import run_task
from tinyllm.models.load import hf_directory

pytestmark = pytest.mark.slow
LIMIT = 20


def test_smollm2_polarity_matches_lm_evals_hf_model(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task = builtin_task("polarity")
    model, tokenizer = load("smollm2-135m")
    lm = ModuleLM(model, tokenizer, "smollm2-135m")
    ours = run_task(lm, task, LIMIT)
    lmeval.export_task(task, tmp_path)
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    common = dict(tasks=["polarity"], task_manager=tm, limit=LIMIT)
    adapter = simple_evaluate(model=lmeval.adapter_class()(lm=lm), **common)
    hf_args = f"pretrained={hf_directory('smollm2-135m')},dtype=float32"
    hf = simple_evaluate(model="hf", model_args=hf_args, device="cpu", batch_size=8, **common)
    for out in (adapter, hf):
        got = out["results"]["polarity"]
        assert (got["acc,none"], got["acc_norm,none"]) == (ours["acc"], ours["acc_norm"])
        assert got["acc_stderr,none"] == pytest.approx(ours["stderr"])
    assert 0.5 < ours["accuracy"] < 1.0  # a real model, better than chance on 20 questions
