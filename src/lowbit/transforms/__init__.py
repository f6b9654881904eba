"""Invertible transforms of a linear's input space (applied to weights, inverted on activations)."""

from .pairwise import PAIRINGS, PairwiseRotation, coefficients, random_pairs, ranked_pairs, rotate_ref

__all__ = ["PAIRINGS", "PairwiseRotation", "coefficients", "random_pairs", "ranked_pairs", "rotate_ref"]
