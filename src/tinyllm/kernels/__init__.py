"""Packed weight layouts, the QuantizedWeight record, QuantLinear and the C++ kernels."""
