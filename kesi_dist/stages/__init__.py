"""Method-neutral stages: short functions taking a `RunContext` and flat specs (never the root config).

    data          convert the data source once, record it
    baseline      train (or import) the unpruned model
    retrain       train a set of branches as parallel Tune trials and register each snapshot
    ensemble      choose the teachers and measure their ensemble
    soft_labels   the teachers' top-k soft labels for every (epoch, image), on an actor pool
    memory_bank   every teacher's logits on every clean training image (EKG), on an actor pool
    distill       a student learns from teachers (online or cached) on a Ray Train worker group
    report        report.json/md, the plot, TensorBoard and MODEL_CARD.md from a method's rows

A method's recipe (`kesi_dist.methods.<name>.recipe`) strings them together.
"""
