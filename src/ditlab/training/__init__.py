"""Training: the loop, the tasks it runs, EMA, checkpoint bundles and the Reporter protocol.
Imports neither ray nor mlflow."""

from ditlab.training.checkpoint import CheckpointError, load_bundle, save_bundle
from ditlab.training.ema import EMA
from ditlab.training.loop import Placement, TrainingDiverged, lr_at, train
from ditlab.training.reporter import LocalReporter, Reporter

__all__ = ["CheckpointError", "EMA", "LocalReporter", "Placement", "Reporter", "TrainingDiverged", "load_bundle",
           "lr_at", "save_bundle", "train"]
