"""A latency table (`kesi latency profile` writes one, `kesi_dist.latency`): read, checked, predicted from.

    load_table(path)                 # the table, every field checked (`validate_table`)
    predict(table, widths)           # predicted ms of the network at `widths`
    check_table(table, path, ...)    # UsageError for another network; warnings for another machine
    validate_table(table, path)      # UsageError naming the file and the field (NaN, inf, negative, ...)
    falls_steeply(table, path)       # warnings: a unit whose cost falls steeply as its width grows
    despike(piece, widths, ms, retime)  # `kesi latency profile`: re-time points far above both neighbours

Plain Python (no torch): what a plan, a budget and a report read. A table is untrusted input: checked
field by field wherever one is read, and cleaned of load spikes when one is measured.

A width timed while another process took the CPU looks like a spike: far above both its neighbours
(a profile taken during other work had one width at 20x them). A search reading such a table would
prune on to reach a budget the spike made look far away. Genuine steps remain: onnxruntime runs
convolutions in channel blocks, so a misaligned width can cost more than the aligned one above it
(what `round_to` is for); those are a few tens of percent, not a factor of `STEEP`, so the table
keeps them rather than being forced to grow with the width.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

from kesi_dist.errors import UsageError

__all__ = ["SCHEMA", "load_table", "predict", "check_table", "table_key", "table_warnings", "plan_latency",
           "cpu_model", "threads_text", "warn_once", "validate_table", "falls_steeply", "spikes", "despike",
           "SPIKE", "STEEP"]

SCHEMA = 1

SPIKE = 2.0  # a grid point above SPIKE x both neighbours is re-measured
STEEP = 2.0  # a piece that costs STEEP x more at a narrower width than at a wider one is warned about

_KEY = {"cpu": str, "runtime": str, "runtime_version": str, "threads": int, "batch": int, "arch": str,
        "num_classes": int, "resolution": int, "options": dict}


def _bad(path, field: str, what: str) -> UsageError:
    return UsageError(f"{path}: latency table field {field}: {what}; make a new one with "
                      f"`kesi latency profile CONFIG --output {path}`")


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _positive_int(value, path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(path, field, f"{value!r} ({_kind(value)}) is not a positive whole number")
    return value


def _time_ms(value, path, field: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(path, field, f"{value!r} ({_kind(value)}) is not a time in ms")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _bad(path, field, f"{value!r} is not a time in ms (a finite number {'>' if positive else '>='} 0)")
    return float(value)


def _get(obj: dict, name: str, kind: type, path, where: str = ""):
    field = f"{where}{name}"
    if name not in obj:
        raise _bad(path, field, "missing")
    value = obj[name]
    if kind is int:
        return _positive_int(value, path, field)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _bad(path, field, f"{value!r} is a {_kind(value)}, expected a {kind.__name__}")
    return value


def validate_table(table, path) -> dict:
    """`table` if every field `predict` and the checks read has its type and a sane value.

    Raises:
        UsageError: one line naming `path` and the first bad field (missing, mistyped, NaN, infinite or
            negative times, widths that do not increase, a unit without its piece).
    """
    for name, kind in _KEY.items():
        _get(_get(table, "key", dict, path), name, kind, path, "key.")
    full = _get(table, "full_widths", list, path)
    if not full:
        raise _bad(path, "full_widths", "empty")
    for i, w in enumerate(full):
        _positive_int(w, path, f"full_widths[{i}]")
    if "full_ms" not in table:
        raise _bad(path, "full_ms", "missing")
    _time_ms(table["full_ms"], path, "full_ms", positive=True)
    pieces = _get(table, "pieces", dict, path)
    for name, piece in pieces.items():
        where = f"pieces[{name!r}]"
        if not isinstance(piece, dict):
            raise _bad(path, where, f"a {_kind(piece)}, expected a mapping with widths and ms")
        widths, ms = _get(piece, "widths", list, path, where + "."), _get(piece, "ms", list, path, where + ".")
        if not widths or len(ms) != len(widths):
            raise _bad(path, f"{where}.ms", f"{len(ms)} times for {len(widths)} widths")
        for i, w in enumerate(widths):
            _positive_int(w, path, f"{where}.widths[{i}]")
            if i and w <= widths[i - 1]:
                raise _bad(path, f"{where}.widths[{i}]", f"{w} after {widths[i - 1]}: widths must increase")
        for i, t in enumerate(ms):
            _time_ms(t, path, f"{where}.ms[{i}]")
    units = _get(table, "units", list, path)
    if len(units) != len(full):
        raise _bad(path, "units", f"{len(units)} units for {len(full)} full_widths")
    for i, (u, c) in enumerate(zip(units, full)):
        if not isinstance(u, dict):
            raise _bad(path, f"units[{i}]", f"a {_kind(u)}, expected a mapping with name and piece")
        _get(u, "name", str, path, f"units[{i}].")
        piece = _get(u, "piece", str, path, f"units[{i}].")
        if piece not in pieces:
            raise _bad(path, f"units[{i}].piece", f"{piece!r} is not in pieces")
        grid = pieces[piece]["widths"]
        if not grid[0] <= c <= grid[-1]:
            raise _bad(path, f"units[{i}]", f"its full width {c} is outside its piece's widths {grid[0]}-{grid[-1]}")
    return table


def spikes(widths: list[int], ms: list[float], factor: float = SPIKE) -> list[int]:
    """Indices of grid points far above both neighbours (one neighbour at the ends; the last point's
    neighbour scaled by the width ratio, as cost grows with width)."""
    n, out = len(ms), []
    for i in range(n):
        if 0 < i < n - 1:
            high = ms[i] > factor * max(ms[i - 1], ms[i + 1])
        elif i == 0:
            high = n > 1 and ms[0] > factor * ms[1]
        else:
            high = n > 1 and ms[i] > factor * ms[i - 1] * widths[i] / widths[i - 1]
        if high:
            out.append(i)
    return out


def _suspects(widths: list[int], ms: list[float]) -> list[int]:
    """Spikes, and points over STEEP x the cheapest wider width (a run of noisy points, not one)."""
    out = set(spikes(widths, ms))
    cheapest = math.inf
    for i in range(len(ms) - 1, -1, -1):
        if ms[i] > STEEP * cheapest:
            out.add(i)
        cheapest = min(cheapest, ms[i])
    return sorted(out)


def despike(piece: str, widths: list[int], ms: list[float], retime, rounds: int = 3) -> list[dict]:
    """Re-time one piece's suspect points (`ms` changed in place): far above both neighbours, or far
    above a wider width. Each round `retime(indices)` times them and their neighbours again,
    interleaved, and each point keeps its least median (load only ever adds time). A spike left after
    `rounds` is set to its higher neighbour; a steep fall left is kept (and warned about where the table
    is read). Returns one entry per point that changed (the table's `remeasured`)."""
    before = list(ms)
    for _ in range(rounds):
        bad = _suspects(widths, ms)
        if not bad:
            break
        around = sorted({j for i in bad for j in (i - 1, i, i + 1) if 0 <= j < len(ms)})
        for j, t in zip(around, retime(around)):
            ms[j] = min(ms[j], t)
    still = spikes(widths, ms)
    for i in still:
        ms[i] = max(ms[j] for j in (i - 1, i + 1) if 0 <= j < len(ms))
    return [{"piece": piece, "width": widths[i], "ms_before": round(before[i], 4), "ms": round(ms[i], 4),
             "how": "set to its neighbour" if i in still else "re-measured"}
            for i in range(len(ms)) if before[i] > SPIKE * ms[i] or i in still]


def falls_steeply(table: dict, path, factor: float = STEEP) -> list[str]:
    """One warning per piece whose time at some width is over `factor` x its time at a wider one (the
    worst such pair), naming the units that use it: predictions there say narrower is slower."""
    users: dict[str, list[str]] = {}
    for u in table["units"]:
        users.setdefault(u["piece"], []).append(u["name"])
    out = []
    for name, piece in table["pieces"].items():
        widths, ms = piece["widths"], piece["ms"]
        worst, pair = factor, None
        low = [0.0] * len(ms)  # low[j]: the least time at a width >= widths[j]
        for j in range(len(ms) - 1, -1, -1):
            low[j] = min(ms[j], low[j + 1]) if j + 1 < len(ms) else ms[j]
        for i in range(len(ms) - 1):
            cheapest = low[i + 1]
            if cheapest > 0 and ms[i] / cheapest > worst:
                j = next(k for k in range(i + 1, len(ms)) if ms[k] == cheapest)
                worst, pair = ms[i] / cheapest, (i, j)
        if pair and name in users:
            i, j = pair
            who = users[name][0] + (f" (and {len(users[name]) - 1} unit(s) alike)" if len(users[name]) > 1 else "")
            out.append(f"{path}: unit {who}: {ms[i]:.3g} ms at width {widths[i]} but {ms[j]:.3g} ms at width "
                       f"{widths[j]}: the cost falls {worst:.1f}x as the width grows (a measurement taken under "
                       "load?); a search on this table may prune further than the budget needs: re-profile "
                       "on an idle machine")
    return out


def threads_text(n: int) -> str:
    return f"{n} thread" + ("" if n == 1 else "s")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_key(arch: str, num_classes: int, resolution: int, options: dict, batch: int, threads: int) -> dict:
    """What a table's numbers depend on: this machine's CPU and onnxruntime, the threads, batch and network."""
    import onnxruntime as ort  # heavy (seconds): only where a table is made or checked against this machine

    return {"cpu": cpu_model(), "runtime": "onnxruntime", "runtime_version": ort.__version__, "threads": threads,
            "batch": batch, "arch": arch, "num_classes": num_classes, "resolution": resolution,
            "options": dict(sorted(options.items()))}


def _interp(widths: list[int], ms: list[float], w: int) -> float:
    if w <= widths[0]:
        return ms[0]
    for (a, ta), (b, tb) in zip(zip(widths, ms), zip(widths[1:], ms[1:])):
        if a <= w <= b:
            return ta + (tb - ta) * (w - a) / (b - a)
    return ms[-1]


def predict(table: dict, widths: list[int]) -> float:
    """Predicted ms of the network at `widths` (one per unit, in the table's unit order)."""
    units = table["units"]
    if len(widths) != len(units):
        raise UsageError(f"latency table has {len(units)} units ({table['key']['arch']}), got {len(widths)} widths")
    ms = table["full_ms"]
    for u, w, c in zip(units, widths, table["full_widths"]):
        p = table["pieces"][u["piece"]]
        ms += _interp(p["widths"], p["ms"], int(w)) - _interp(p["widths"], p["ms"], int(c))
    return ms


def load_table(path: str | Path) -> dict:
    """A table written by `kesi latency profile`, every field checked (`validate_table`); UsageError
    naming the file (and the field) when it is not one."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: no such latency table; make one with `kesi latency profile CONFIG "
                         f"--output {path}`") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable latency table ({e})") from None
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or "pieces" not in table:
        raise UsageError(f"{path}: not a kesi latency table (schema {SCHEMA}); make one with `kesi latency profile`")
    return validate_table(table, path)


def check_table(table: dict, path, arch: str, num_classes: int, resolution: int, options: dict) -> list[str]:
    """UsageError when the table is for another network; the ways this machine differs from the
    table's (CPU, runtime version) as warnings: the prediction is for the machine that measured it."""
    key = table["key"]
    want = {"arch": arch, "num_classes": num_classes, "resolution": resolution, "options": dict(sorted(options.items()))}
    for k, v in want.items():
        if key.get(k) != v:
            raise UsageError(f"{path}: the latency table is for {k}={key.get(k)!r}, this config has {v!r}; "
                             "profile this network with `kesi latency profile <this config> --output TABLE`")
    here = table_key(arch, num_classes, resolution, options, key["batch"], key["threads"])
    out = [f"{path}: measured on {k}={key[k]!r}, this machine has {here[k]!r}; predictions are for that machine"
           for k in ("cpu", "runtime_version") if key[k] != here[k]]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if key["threads"] > cpus:
        out.append(f"{path}: measured with {threads_text(key['threads'])} (batch {key['batch']}), this machine gives "
                   f"this process {cpus} CPU(s); predictions and any latency measured here are not comparable")
    return out


def table_warnings(table: dict, path, *, arch: str, num_classes: int, resolution: int, options: dict) -> list[str]:
    """`check_table`'s warnings for a network (another CPU, runtime or too many threads for this machine)
    and `falls_steeply`'s (a cost that falls steeply with the width)."""
    return check_table(table, path, arch, num_classes, resolution, options) + falls_steeply(table, path)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """`warning: message` on stderr, once per process (a table is read by the plan and by the run)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)


def plan_latency(plan: dict, table: dict) -> dict:
    """`plan` (from `plan_schedule`) with each row's predicted ms (`latency_ms`) at the table's batch and
    threads. Masked (MWP) rows keep their dense widths, so their prediction is the dense network's."""
    rows = plan["iterations"]
    for r in rows:
        r["latency_ms"] = round(predict(table, r["widths"]), 3)
    key = table["key"]
    plan["latency"] = {"batch": key["batch"], "threads": key["threads"], "runtime": key["runtime"],
                       "runtime_version": key["runtime_version"], "cpu": key["cpu"]}
    return plan
