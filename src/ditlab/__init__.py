"""ditlab: experiment orchestration and evaluation for diffusion transformers."""
__version__ = "0.1.0"
