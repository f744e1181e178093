"""Training: a pack of K >= 1 models (``pack``), its run directories (``rundir``), the loop
(``train``, ``train_packed``), evaluation and the optimiser."""

from icl.train.loop import PackTrainingDiverged, TrainingDiverged, train, train_packed
from icl.train.rundir import RunDir

__all__ = ["train", "train_packed", "RunDir", "TrainingDiverged", "PackTrainingDiverged"]
