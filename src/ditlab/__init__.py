"""ditlab: experiment orchestration and evaluation for diffusion transformers."""
from ditlab.telemetry import telemetry_off

__version__ = "0.1.0"
telemetry_off()  # before Ray, MLflow or DVC is imported by anything of ditlab's (telemetry.py says why)
