"""EKG (Lee & Song, ECCV 2022): a greedy, training-free sub-network search scored with the ensemble
knowledge of the interim sub-networks, then fine-tuning from a memory bank of their logits.

In progress (issue 15): the search (`search.SubnetSearch`, plain PyTorch on holdout tensors), the
memory bank's teacher pick (`bank`) and the curriculum loss (`kesi_dist.distill.curriculum`) are here
and tested; the recipe, config, registry entry, actor-pool evaluation and fine-tuning arms are not, so
`method: {name: ekg}` is not yet accepted.
"""
