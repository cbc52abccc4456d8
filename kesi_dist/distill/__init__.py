"""Distillation, plain PyTorch: KD losses, the teacher ensemble and its selection, teacher sources
(online or cached), and the formats of the soft-label cache and the memory bank."""

from kesi_dist.distill.ensemble import ensemble_probs, evaluate_ensemble, freeze, load_teachers
from kesi_dist.distill.losses import dense_from_topk, kd_loss, topk_probs, truncation_bound
from kesi_dist.distill.soft_label_cache import SoftLabelCache, SoftLabelWorker
from kesi_dist.distill.sources import CachedSoftLabels, OnlineTeachers
from kesi_dist.distill.teachers import POLICIES, disagreement, select_teachers

__all__ = [
    "kd_loss", "topk_probs", "dense_from_topk", "truncation_bound",
    "load_teachers", "freeze", "ensemble_probs", "evaluate_ensemble",
    "POLICIES", "select_teachers", "disagreement",
    "SoftLabelCache", "SoftLabelWorker", "OnlineTeachers", "CachedSoftLabels",
]
