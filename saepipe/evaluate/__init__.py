"""Evaluation of trained SAEs on held-out activations (docs/reference.md §3)."""
