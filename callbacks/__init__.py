"""Lightning callbacks: retrieval evaluation (and, later, curriculum)."""

from callbacks.retrieval_evaluation import RetrievalEvaluation

__all__ = ["RetrievalEvaluation"]
