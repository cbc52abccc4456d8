"""kesi_dist: distributed iterative pruning with ensemble distillation (KESI)."""
__version__ = "0.1.0"
