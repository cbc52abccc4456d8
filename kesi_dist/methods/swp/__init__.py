"""SWP (Rong, Ou, Zhang et al., arXiv 2011.04908): stage-wise supernets trained with the sandwich rule and
in-place distillation, then a search under a budget (MACs, or a latency table); no public code exists.
"Stage" here is the network's (a run of blocks at one width); the pipeline's stages are `*_stage.py`.

    config.py       the `method: {name: swp}` section
    evolution.py    regularised evolution under a MACs band, plain Python
    correlation.py  Kendall tau-b, Spearman rho, mean gap
    supernets_stage.py  the supernets stage (one Ray Train run per network stage, in parallel)
    search_stage.py     the search stage: the proxy on an actor pool, evolution (resumable per generation)
    recipe.py       data -> baseline -> supernets -> search -> retrain (Tune trials) -> report
    plan.py, report.py
The slimmable view is `kesi_dist.models.slimmable`, the supernet training `kesi_dist.train.supernet`.
"""
