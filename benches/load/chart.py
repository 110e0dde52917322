"""The load benchmark's chart: ferrule's throughput relative to each peer, and every server's fraction of the
nginx ceiling, per thread count."""

from __future__ import annotations

from pathlib import Path

from .scenarios import SCENARIOS


def draw_chart(path: Path, rows: list[dict], names: list[str], thread_counts: list[int]) -> None:
    """`names`: the servers in the order of the run; each bar group is one peer (or scenario) at one thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scenarios = [sc.name for sc in SCENARIOS if any(r["scenario"] == sc.name for r in rows)]
    peers = [(n, t) for t in thread_counts for n in names if n not in ("ferrule", "nginx")]
    servers = [n for n in names if n != "nginx"]
    with_ceiling = [s for s in scenarios if any(r["scenario"] == s and r["server"] == "nginx" for r in rows)]
    ceiling_scenarios = [(s, t) for t in thread_counts for s in with_ceiling]

    def value(scenario, server, threads, key):
        r = next(
            (x for x in rows if x["threads"] == threads and x["scenario"] == scenario and x["server"] == server), None
        )
        return (r or {}).get(key) or 0.0

    def label(name, threads):
        return f"{name}\n{threads} thread{'s' if threads > 1 else ''}"

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(scenarios), 1)
    for i, sc in enumerate(scenarios):
        xs = [p + (i - (len(scenarios) - 1) / 2) * width for p in range(len(peers))]
        ax1.bar(xs, [value(sc, p, t, "ferrule_over_rps") for p, t in peers], width, label=sc)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    # Ratios on a log scale, so that twice as fast and half as fast are the same distance from 1.
    ax1.set_yscale("log", base=2)
    ratios = [value(sc, p, t, "ferrule_over_rps") for sc in scenarios for p, t in peers]
    lo, hi = min([1.0, *[r for r in ratios if r > 0]]), max([1.0, *ratios])
    ax1.set_ylim(lo / 1.15, hi * 1.15)
    ax1.set_yticks(
        [t for t in (0.125, 0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 8, 16) if lo / 1.15 <= t <= hi * 1.15]
    )
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xticks(range(len(peers)), [label(f"vs {p}", t) for p, t in peers])
    ax1.set_ylabel("ferrule req/s ÷ peer req/s (above 1: ferrule faster)")
    ax1.set_title("ferrule's throughput relative to each peer")
    ax1.legend(fontsize=8, ncol=2)

    width = 0.8 / max(len(servers), 1)
    for i, s in enumerate(servers):
        xs = [p + (i - (len(servers) - 1) / 2) * width for p in range(len(ceiling_scenarios))]
        ax2.bar(xs, [value(sc, s, t, "of_ceiling") for sc, t in ceiling_scenarios], width, label=s)
    ax2.set_xticks(range(len(ceiling_scenarios)), [label(sc, t) for sc, t in ceiling_scenarios])
    ax2.set_ylabel("fraction of nginx answering itself")
    ax2.set_title("Throughput as a fraction of the nginx ceiling")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
