"""Evaluation of trained SAEs on held-out activations (SPEC §3)."""
