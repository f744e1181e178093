"""Training one run: optimiser, evaluation, checkpoints and the loop (``train``)."""

from icl.train.checkpoint import install_checkpoint
from icl.train.loop import TIMING_COLUMNS, TrainingDiverged, train

__all__ = ["train", "install_checkpoint", "TrainingDiverged", "TIMING_COLUMNS"]
