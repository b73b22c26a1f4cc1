"""Evaluation: Inception features (offline), FID, and the conditional-accuracy classifier."""

from ditlab.evaluation.features import WeightsNotFound, find_inception_weights, inception_features
from ditlab.evaluation.fid import fid_from_features, frechet_distance

__all__ = ["WeightsNotFound", "find_inception_weights", "inception_features", "fid_from_features",
           "frechet_distance"]
