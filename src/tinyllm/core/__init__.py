"""Shared machinery (layer 3, docs/architecture.md): step configs and their registry, compress(),
block-by-block calibration, Hessians and activation statistics, CPU kernel helpers, and `load`
(any model spec, tinyllm checkpoints included)."""
