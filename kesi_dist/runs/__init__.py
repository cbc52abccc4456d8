"""A run's folder, its manifest and the `RunContext` every stage is handed.

    rundir.py    where a run's files live; creating or reopening one (`open_run`)
    manifest.py  stage status + snapshot registry, one JSON file written atomically
    context.py   RunContext: `with ctx.stage(name):` bookkeeping, snapshot registration, the console
"""

from kesi_dist.runs.context import RunContext, Stage, describe_snapshot, fmt_acc, fmt_size, select_acc
from kesi_dist.runs.manifest import Manifest
from kesi_dist.runs.rundir import RunDir, open_run

__all__ = ["RunContext", "Stage", "describe_snapshot", "fmt_size", "fmt_acc", "select_acc", "Manifest", "RunDir", "open_run"]
