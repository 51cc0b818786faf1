"""Weight quantization: pure math (primitives), the QuantizedWeight record, QuantLinear, methods."""
