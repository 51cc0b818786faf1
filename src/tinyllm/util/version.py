"""The package version, at the bottom layer so every layer can record it (`tinyllm.__version__`)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version
