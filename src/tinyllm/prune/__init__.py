"""Pruning: unstructured, N:M, outlier-aware allocation, structured (heads, channels, blocks)."""
