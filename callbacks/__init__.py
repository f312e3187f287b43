"""Lightning callbacks: retrieval evaluation, curriculum."""

from callbacks.curriculum import Curriculum, Stage
from callbacks.retrieval_evaluation import RetrievalEvaluation

__all__ = ["Curriculum", "RetrievalEvaluation", "Stage"]
