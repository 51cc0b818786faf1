"""Errors a user can cause. The CLI prints their message on one line and exits non-zero."""


class TinyLLMError(Exception):
    """Base of every error caused by input: the message says what was wrong and what to do."""


class ModelNotFoundError(TinyLLMError):
    """A model spec names no registered model, no existing file and no existing directory."""


class ModelLoadError(TinyLLMError):
    """A model file or directory exists but cannot be read as a model."""


class ArchitectureError(TinyLLMError):
    """The model graph lacks something tinyllm needs (decoder blocks, linear layers)."""


class CorpusError(TinyLLMError):
    """A corpus cannot be read, is empty, or is too short for what was asked."""


class TokenizerMismatchError(TinyLLMError):
    """Two models that must share a tokenizer do not."""


class ConfigError(TinyLLMError):
    """A setting is out of range or inconsistent."""
