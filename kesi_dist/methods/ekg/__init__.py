"""EKG (Lee & Song, ECCV 2022): a greedy, training-free sub-network search scored with the ensemble
knowledge of the interim sub-networks, then fine-tuning from a memory bank of their logits.

    config.py   the `method: {name: ekg}` section
    search.py   the greedy loop, plain PyTorch, and the uniform arm's widths
    evaluator.py  what scores a sub-network on the holdout (what each actor of the search holds)
    teacher_pick.py  which interim sub-networks become the memory bank's teachers
    search_stage.py  the pipeline's search stage on an actor pool (resumable per step), its teachers, and
                the uniform arm's initial net
    recipe.py   data -> baseline -> search -> memory_bank -> finetune (3 arms as Tune trials) -> report
    plan.py, report.py
The memory bank's format and pass are method-neutral (`kesi_dist.distill.memory_bank_cache`,
`kesi_dist.stages.memory_bank`), as is the curriculum loss (`kesi_dist.distill.curriculum`).
"""
