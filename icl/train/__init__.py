"""Training: the loop (``train``, ``train_packed``: every run is a pack of K >= 1 models), the
pack's stack (``stack``) and step (``step``), its optimiser (``adamw``, ``optim``), precision
(``precision``), evaluation, and the run directories (``rundir``, ``checkpoint``)."""

from icl.train.loop import PackTrainingDiverged, TrainingDiverged, train, train_packed
from icl.train.rundir import RunDir

__all__ = ["train", "train_packed", "RunDir", "TrainingDiverged", "PackTrainingDiverged"]
