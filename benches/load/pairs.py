"""ferrule against each peer, pair by pair: each round runs the servers in turn (A B A B ...), so a round's ferrule
run and a peer's run are a pair measured minutes apart at most; the ratio of each pair, and their median, is what
a noisy machine can be judged by (a drift of the machine between rounds moves both halves of a pair)."""

from __future__ import annotations

from dataclasses import dataclass

from harness.report import fmt, md_table

from .runs import Run, median
from .scenarios import SCENARIOS

# The per-pair metrics: (Run field, column title). Worker CPU first: it is what the per-worker method judges.
PAIR_METRICS = [("worker_cpu_us_per_req", "worker CPU/req"), ("rps", "req/s")]


@dataclass
class Pairs:
    threads: int
    scenario: str
    peer: str
    rounds: list[int]
    # For each metric of PAIR_METRICS: ferrule's value over the peer's, one per round (None where one is missing).
    ratios: dict[str, list[float | None]]

    def median(self, metric: str) -> float | None:
        return median(self.ratios[metric])


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def pair_ratios(runs: list[Run], threads: int, peers: list[str]) -> list[Pairs]:
    """Every pair of one thread count, per scenario and peer, in the order of the run."""
    out = []
    for sc in SCENARIOS:
        ferrule = {r.round: r for r in runs if r.threads == threads and r.scenario == sc.name and r.server == "ferrule"}
        for peer in peers:
            theirs = {r.round: r for r in runs if r.threads == threads and r.scenario == sc.name and r.server == peer}
            rounds = sorted(set(ferrule) & set(theirs))
            if not rounds:
                continue
            ratios = {
                m: [_ratio(getattr(ferrule[n], m), getattr(theirs[n], m)) for n in rounds] for m, _ in PAIR_METRICS
            }
            out.append(Pairs(threads, sc.name, peer, rounds, ratios))
    return out


def pairs_table(pairs: list[Pairs]) -> str:
    """Scenario and peer down; per metric the median of the pair ratios, then every pair's ratio in round order."""
    head = ["scenario", "peer", "pairs"]
    for _, title in PAIR_METRICS:
        head += [f"{title} median", f"{title} each pair"]
    body = []
    for p in pairs:
        cells = [p.scenario, p.peer, str(len(p.rounds))]
        for m, _ in PAIR_METRICS:
            cells += [fmt(p.median(m), 3, "×"), " ".join(fmt(v, 3) for v in p.ratios[m])]
        body.append(cells)
    return (
        "### ferrule / peer, pair by pair\n\n"
        "Each round runs the servers in turn, so a round's ferrule run and the peer's make a pair: each pair's ratio "
        "(ferrule's value over the peer's) in round order, and the median of those ratios. Below 1 is better for "
        "worker CPU per request, above 1 for req/s.\n\n" + md_table(head, body)
    )
