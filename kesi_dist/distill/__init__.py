"""Distillation: KD losses, the teacher ensemble and its selection, cached soft labels, training hooks."""

from kesi_dist.distill.cache import SoftLabelCache, build_soft_label_cache
from kesi_dist.distill.ensemble import ensemble_probs, evaluate_ensemble, freeze, load_teachers
from kesi_dist.distill.hooks import CachedKD, OnlineKD
from kesi_dist.distill.losses import dense_from_topk, kd_loss, topk_probs, truncation_bound
from kesi_dist.distill.teachers import POLICIES, disagreement, select_teachers

__all__ = [
    "kd_loss", "topk_probs", "dense_from_topk", "truncation_bound",
    "load_teachers", "freeze", "ensemble_probs", "evaluate_ensemble",
    "POLICIES", "select_teachers", "disagreement",
    "build_soft_label_cache", "SoftLabelCache",
    "OnlineKD", "CachedKD",
]
