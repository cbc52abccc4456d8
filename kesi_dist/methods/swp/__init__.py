"""SWP (Rong, Ou, Zhang et al., arXiv 2011.04908): stage-wise supernets trained with the sandwich rule and
in-place distillation, then a search under a MACs budget; no public code exists, shared/design/EKG_SWP.md
part B separates what the paper says from the design choices that fill its gaps.

    config.py       the `method: {name: swp}` section
    evolution.py    regularised evolution under a MACs band, plain Python
    correlation.py  Kendall tau-b, Spearman rho, mean gap
    stages.py       the supernets (one Ray Train run per stage, in parallel), the proxy on an actor pool,
                    the search (resumable per generation)
    recipe.py       data -> baseline -> supernets -> search -> retrain (Tune trials) -> report
    plan.py, report.py
The slimmable view is `kesi_dist.models.slimmable`, the supernet training `kesi_dist.train.supernet`.
"""
