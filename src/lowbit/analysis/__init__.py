"""Analyses that explain where quantization error comes from."""
