"""bnaudit: numerical-reproducibility auditing of the batch-norm noisy-feature experiment."""

__version__ = "0.1.0"
