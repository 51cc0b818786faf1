"""Corpora and the deterministic windows cut from them."""
