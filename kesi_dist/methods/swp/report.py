"""SWP's report, built from the manifest alone: the searched net vs uniform pruning at the same budget,
the correlation study (how well each supernet's proxy ranks sub-nets by their retrained accuracy), the
search and the supernets' parallel runs. Correlation accuracies are in percent: proxies on the holdout,
`retrained` on the test split (`retrained_holdout` on the holdout)."""

from __future__ import annotations

from kesi_dist.budget import recorded_budget, reached, search_fields
from kesi_dist.fields import get_field
from kesi_dist.methods.swp.correlation import summary
from kesi_dist.report import ReportLayout, latency_entry, save_figure, size_row

__all__ = ["build_report", "layout", "sections", "write_scatter", "status_detail"]


def _pct(x) -> float | None:
    return None if x is None else round(100 * x, 4)


def build_report(manifest: dict) -> dict:
    snaps: dict[str, dict] = manifest["snapshots"]
    stages: dict[str, dict] = manifest["stages"]
    search, nets = stages.get("search", {}), stages.get("supernets", {})
    study = []
    for i, s in enumerate(search.get("subnets") or []):
        r = snaps.get(f"subnet{i}")
        study.append({"widths": s["widths"], "macs": s["macs"], "proxy_swp": _pct(s["proxy_swp"]),
                      "proxy_whole_net": _pct(s["proxy_whole_net"]), "retrained": _pct(r["val_acc"]) if r else None,
                      "retrained_holdout": _pct(r.get("holdout_acc")) if r else None})
    done = [s for s in study if s["retrained"] is not None]
    correlation = None
    if len(done) >= 2:
        actual = [s["retrained"] for s in done]
        correlation = {"swp": summary([s["proxy_swp"] for s in done], actual),
                       "whole_net": summary([s["proxy_whole_net"] for s in done], actual), "subnets": study}
    gens = search.get("generations") or []
    timings = {name: round(st["end"] - st["start"], 2) for name, st in stages.items()
               if st.get("status") == "complete" and "end" in st and "start" in st}
    return {
        "method": "swp", "status": manifest.get("status"),
        "baseline": size_row(snaps.get("baseline")), "swp": size_row(snaps.get("student")),
        "uniform": size_row(snaps.get("uniform")),
        "correlation": correlation,
        "search": {**search_fields(search),
                   "widths": search.get("widths"), "best_proxy": _pct(search.get("proxy")),
                   "generations": max(0, len(gens) - 1), "evaluated": search.get("evaluated"),
                   "history": [{k: g[k] for k in ("generation", "best", "mean", "evaluated")} for g in gens]},
        "supernets": {"runs": nets.get("runs") or [], "overlap_s": nets.get("overlap")},
        "test_images": stages.get("data", {}).get("val_size"),
        "chain": [], "snapshots": list(snaps.values()), "timings": timings,
        **latency_entry(stages),
    }


def sections(report: dict) -> list[str]:
    lines: list[str] = []
    s, u = report.get("swp"), report.get("uniform")
    if s and u:
        lines += ["", "## What the numbers say", "",
                  f"- searched vs uniform widths, same retraining: {100 * (s['val_acc'] - u['val_acc']):+.2f} points "
                  f"(MACs {s['macs'] / 1e6:.2f} M vs {u['macs'] / 1e6:.2f} M)"]
        if report.get("test_images"):
            lines.append(f"- one test image is {100 / report['test_images']:.2f} points on this test split")
    c = report.get("correlation")
    if c:
        lines += ["", "## Proxy vs retrained accuracy", "",
                  f"{len(c['subnets'])} sub-nets in the MACs band, each retrained from the baseline with the same "
                  "schedule; proxies: holdout accuracy of the sub-net cut out of each supernet, BatchNorm "
                  "recalibrated. Plot: `correlation.png`.", "",
                  "| supernet | Kendall tau | Spearman rho | mean gap (points) |", "|---|---|---|---|"]
        for key, label in (("swp", "SWP (stage-wise, sandwich, in-place KD)"),
                           ("whole_net", "whole network, uniform sampling, CE")):
            m = c[key]
            lines.append(f"| {label} | {m['kendall_tau']:.3f} | {m['spearman_rho']:.3f} | {m['mean_gap']:.2f} |")
        lines += ["", "| sub-net | MACs (M) | proxy SWP (%) | proxy whole net (%) | retrained test (%) |",
                  "|---|---|---|---|---|"]
        for i, r in enumerate(c["subnets"]):
            ret = "–" if r["retrained"] is None else f"{r['retrained']:.2f}"
            lines.append(f"| subnet{i} | {r['macs'] / 1e6:.2f} | {r['proxy_swp']:.2f} | {r['proxy_whole_net']:.2f} | "
                         f"{ret} |")
    sr = report.get("search") or {}
    if sr.get("history"):
        lines += ["", "## Search", "",
                  f"{sr['generations']} generations, {sr['evaluated']} sub-nets evaluated; best proxy "
                  f"{sr['best_proxy']:.2f} % at {reached(sr)}."]
    runs = (report.get("supernets") or {}).get("runs") or []
    if runs:
        t0 = min(r["start"] for r in runs)
        lines += ["", "## Supernets", "",
                  f"Each a Ray Train run of its own; {report['supernets']['overlap_s']:.0f} s with two or more stage "
                  "supernets training at once.", "", "| run | stage | start (s) | end (s) | node |", "|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['name']} | {r['stage']} | {r['start'] - t0:.0f} | {r['end'] - t0:.0f} | "
                         f"{(r['node_id'] or '?')[:12]} |")
    return lines


def write_scatter(path: str, report: dict) -> None:
    """correlation.png: proxy vs retrained accuracy of the study's sub-nets, for both supernets."""
    c = report.get("correlation")
    if not c:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [s for s in c["subnets"] if s["retrained"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for key, label, marker in (("proxy_swp", "SWP", "o"), ("proxy_whole_net", "whole network", "s")):
        m = c["swp" if key == "proxy_swp" else "whole_net"]
        ax.scatter([s[key] for s in done], [s["retrained"] for s in done], marker=marker, alpha=0.7,
                   label=f"{label} (tau {m['kendall_tau']:.2f}, rho {m['spearman_rho']:.2f})")
    ax.set_xlabel("proxy: holdout top-1 of the sub-net in the supernet (%)")
    ax.set_ylabel("retrained: test top-1 (%)")
    ax.set_title("SWP correlation study: proxy vs retrained accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def status_detail(stage: str, record: dict, config: dict) -> str | None:
    """`kesi status`'s line for the search stage: the last generation of the evolution, its best proxy and
    the budget's target (every field checked: `kesi_dist.fields.FieldError` names a damaged one)."""
    gens = get_field(record, "generations", list, f"stages.{stage}", required=False) if stage == "search" else None
    if not gens:
        return None
    where = "stages.search.generations[-1]"
    g = get_field({"generations[-1]": gens[-1]}, "generations[-1]", dict, "stages.search")
    search = (config.get("method") or {}).get("search")
    total = search.get("generations") if isinstance(search, dict) else None
    budget = recorded_budget(record, "stages.search")
    return (f"generation {get_field(g, 'generation', int, where)}" + (f"/{total}" if isinstance(total, int) else "")
            + f", best proxy {100 * get_field(g, 'best', float, where):.2f}%"
            + (f" ({budget[0].target_words(budget[1])})" if budget else ""))


def layout(cfg) -> ReportLayout:
    b = cfg.method.budget()
    what = f"{cfg.model.arch} searched by SWP under {b.label}"
    return ReportLayout(
        title=f"{cfg.model.arch} · SWP under {b.label.replace(' of its ', ' ')} · {cfg.data.source}",
        rows=(("baseline", "baseline", "baseline"), ("SWP: searched + retrained", "swp", "SWP"),
              (f"uniform L1 + retrained (equal {b.short})", "uniform", "uniform")),
        deliverables=("swp",),
        card_titles={"swp": f"{what}, retrained"},
        arms={"swp": "SWP", "uniform": "uniform", "subnet": "correlation sub-nets"},
        sections=sections,
    )
