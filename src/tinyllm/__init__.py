"""tinyllm: compress a pretrained LLM, evaluate it, export it and serve it on the edge.

Public API::

    model, tokenizer = tinyllm.load("smollm2-135m")
    result = tinyllm.evaluate(model, tokenizer)
"""

from tinyllm.errors import TinyLLMError
from tinyllm.eval.evaluate import EvalResult, evaluate
from tinyllm.models.load import DEFAULT_MODEL, load

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "EvalResult", "TinyLLMError", "evaluate", "load"]
