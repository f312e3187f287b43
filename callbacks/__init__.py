"""Lightning callbacks: retrieval evaluation, curriculum, hard non-landmark mining."""

from callbacks.curriculum import Curriculum, Stage
from callbacks.hard_nonlandmarks import HardNonlandmarkMining
from callbacks.retrieval_evaluation import RetrievalEvaluation

__all__ = ["Curriculum", "HardNonlandmarkMining", "RetrievalEvaluation", "Stage"]
