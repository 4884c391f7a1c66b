"""Reusable layers: dense FFNs, BitNet b1.58 linear."""
