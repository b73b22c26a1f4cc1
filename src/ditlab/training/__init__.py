"""Training: the loop, EMA, checkpoint bundles and the Reporter protocol. Imports neither ray nor mlflow."""

from ditlab.training.checkpoint import CheckpointError, load_bundle, save_bundle
from ditlab.training.ema import EMA
from ditlab.training.loop import Placement, build_diffusion, build_model_for, lr_at, train
from ditlab.training.reporter import LocalReporter, Reporter

__all__ = ["CheckpointError", "EMA", "LocalReporter", "Placement", "Reporter", "build_diffusion",
           "build_model_for", "load_bundle", "lr_at", "save_bundle", "train"]
