"""The evaluation harness: one protocol for every artifact."""
