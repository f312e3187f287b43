"""Lightning callbacks: retrieval evaluation, curriculum, hard non-landmark mining, stopping launched
DDP ranks when rank 0 fails."""

from callbacks.curriculum import Curriculum, Stage
from callbacks.hard_nonlandmarks import HardNonlandmarkMining
from callbacks.launched_ranks import StopLaunchedRanksOnError
from callbacks.retrieval_evaluation import RetrievalEvaluation

__all__ = ["Curriculum", "HardNonlandmarkMining", "RetrievalEvaluation", "Stage", "StopLaunchedRanksOnError"]
