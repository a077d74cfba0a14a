"""Training: stage-1 attention transfer and stage-2 fine-tuning of a planned student."""

from .distill import distill

__all__ = ["distill"]
