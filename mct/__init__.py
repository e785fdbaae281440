"""mct: Mode-Covering Training (EM distillation) of diffusion models into one-step generators."""

__version__ = "0.1.0"
