"""Pruning, split as Torch-Pruning splits it: what to prune, how much, how to cut, and masks.

  criteria   what to prune: L1 filter ranking, global magnitude selection (pure scoring)
  schedules  how much: kept counts, per-unit ratios, MWP sparsity targets (pure functions)
  surgery    how to cut: kept filter indices per unit -> a physically smaller zoo model
  masks      unstructured masks and the constraint that holds them through optimizer steps
  pfec, mwp  the two methods of the KESI paper, composed from the above
  counting   parameter and MAC counts

Which method runs at which iteration is the caller's decision; nothing here modifies its input model.
"""

from kesi_dist.pruning.counting import count_macs, count_nonzero_params, count_params, macs_function
from kesi_dist.pruning.criteria import global_magnitude_keep, l1_filter_norms, l1_keep_indices
from kesi_dist.pruning.masks import MaskConstraint, apply_masks, conv_weights, mask_gradients, sparsity
from kesi_dist.pruning.mwp import mwp_masks
from kesi_dist.pruning.pfec import pfec_prune
from kesi_dist.pruning.schedules import align, aligned_count, kept_count, sparsity_target, uniform_widths, unit_ratios
from kesi_dist.pruning.surgery import slice_units

__all__ = [
    "l1_filter_norms", "l1_keep_indices", "global_magnitude_keep",
    "align", "aligned_count", "kept_count", "unit_ratios", "sparsity_target", "uniform_widths",
    "slice_units",
    "conv_weights", "apply_masks", "mask_gradients", "sparsity", "MaskConstraint",
    "pfec_prune", "mwp_masks",
    "count_params", "count_nonzero_params", "count_macs", "macs_function",
]
