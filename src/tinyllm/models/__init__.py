"""Model loading, the registry of named models, and anatomy (blocks and linears from the graph)."""

from tinyllm.models.anatomy import Anatomy, LinearSite, analyze
from tinyllm.models.load import DEFAULT_MODEL, load, resolve

__all__ = ["DEFAULT_MODEL", "Anatomy", "LinearSite", "analyze", "load", "resolve"]
