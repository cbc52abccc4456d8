"""EKG (Lee & Song, ECCV 2022): a greedy, training-free sub-network search scored with the ensemble
knowledge of the interim sub-networks, then fine-tuning from a memory bank of their logits.

In progress (issue 15): the pure pieces of the search (`search`) and of the memory bank (`bank`) are
here and tested; the recipe, config and registry entry are not, so `method: {name: ekg}` is not yet
accepted. The fine-tuning loss is `kesi_dist.distill.curriculum`.
"""
