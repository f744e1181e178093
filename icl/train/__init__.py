"""Training one run: optimiser, evaluation, checkpoints and the loop (``train``)."""

from icl.train.checkpoint import install_checkpoint
from icl.train.loop import TIMING_COLUMNS, TrainingDiverged, train
from icl.train.packed import train_packed

__all__ = ["train", "train_packed", "install_checkpoint", "TrainingDiverged", "TIMING_COLUMNS"]
