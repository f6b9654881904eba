"""Evaluation: perplexity (attention fidelity and lm-eval adapters come later)."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
