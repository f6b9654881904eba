"""Evaluation: perplexity; lm-evaluation-harness tasks in `lowbit.eval.lm_eval` (imported on demand)."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
