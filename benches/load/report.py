"""The load benchmark's report: tables on stdout and in latest.md, latest.csv, latest-runs.csv and latest.png."""

from __future__ import annotations

import csv
from pathlib import Path

from harness.report import csv_value, fmt, md_table, ratio
from harness.versions import machine_rows, package_version, run_quiet

from .runs import CSV_FIELDS, RATIO_METRICS, Run
from .scenarios import FILE_CONNECTIONS, SCENARIOS
from .servers import Backend


def server_names(backends: list[Backend]) -> list[str]:
    """Each server once, in the order of the run (a server's TLS instance is the same server)."""
    return list(dict.fromkeys(b.name for b in backends))


def _throughput_table(rows: list[dict], names: list[str]) -> str:
    """Scenarios down, servers across."""
    head = ["scenario"] + [f"{n} req/s" for n in names]
    body = []
    for sc in SCENARIOS:
        cells = [sc.name]
        have = False
        for n in names:
            r = next((x for x in rows if x["scenario"] == sc.name and x["server"] == n), None)
            have |= r is not None
            cells.append(fmt(r["rps"], 0) if r else "–")
        if have:
            body.append(cells)
    return "### Throughput (requests/s, median of rounds)\n\n" + md_table(head, body)


def _ratio_table(rows: list[dict], servers: list[str]) -> str:
    head = ["scenario", "peer", "req/s", "p50", "p99", "CPU/req", "RSS/worker (load)", "RSS/worker (idle)"]
    body = []
    for sc in SCENARIOS:
        for n in servers:
            if n == "ferrule":
                continue
            r = next((x for x in rows if x["scenario"] == sc.name and x["server"] == n), None)
            if r:
                body.append([sc.name, n] + [ratio(r[f"ferrule_over_{m}"]) for m in RATIO_METRICS])
    return (
        "### ferrule / peer\n\nEach cell is ferrule's value divided by the peer's: above 1 is better for req/s, "
        "below 1 is better for latency, CPU and memory.\n\n" + md_table(head, body)
    )


def _scenario_tables(rows: list[dict], args, notes: dict[str, list[str]]) -> list[str]:
    """Every metric, one table per scenario."""
    head = ["server", "req/s", "of nginx", "p50 ms", "p99 ms", "failed", "CPU µs/req", "nginx CPU µs/req",
            "RSS MiB/worker load", "RSS MiB/worker idle", "PSS MiB/worker load"]  # fmt: skip
    parts = []
    for sc in SCENARIOS:
        mine = [x for x in rows if x["scenario"] == sc.name]
        if not mine:
            continue
        body = []
        for r in mine:
            body.append(
                [
                    r["server"],
                    fmt(r["rps"], 0),
                    fmt(r["of_ceiling"] * 100, 0, "%") if r["of_ceiling"] is not None else "–",
                    fmt(r["p50_ms"], 2),
                    fmt(r["p99_ms"], 2),
                    str(r["failed"]),
                    fmt(r["cpu_us_per_req"], 0),
                    fmt(r["nginx_cpu_us_per_req"], 0),
                    fmt(r["rss_mib"], 1),
                    fmt(r["idle_rss_mib"], 1),
                    fmt(r["pss_mib"], 1),
                ]
            )
        conns = sc.connections or args.connections
        text = f"### {sc.name}: {sc.description}, {conns} connections\n\n" + md_table(head, body)
        if notes.get(sc.name):
            text += "\n\n" + "\n".join(f"- {n}" for n in notes[sc.name])
        parts.append(text)
    return parts


def results_tables(rows: list[dict], backends: list[Backend], args, notes: dict[str, list[str]]) -> str:
    names = server_names(backends)
    servers = [n for n in names if n != "nginx"]
    parts = [_throughput_table(rows, names), _ratio_table(rows, servers), *_scenario_tables(rows, args, notes)]
    return "\n\n".join(parts)


def machine_info(args, backends: list[Backend]) -> list[tuple[str, str]]:
    wrk_v = run_quiet([args.wrk, "-v"]).splitlines()
    info = machine_rows(args.venv, cpu=True) + [
        ("wrk", wrk_v[0].split()[1] if wrk_v and len(wrk_v[0].split()) > 1 else "?"),
    ]
    for b in backends:
        if b.tls and b.status == "ok":
            continue  # the same server as its Unix-socket instance
        info.append((b.prefix, b.version + ("" if b.status == "ok" else f" ({b.status})")))
    info.append(("flask", package_version(args.venv, "flask")))
    return info


SETUP_NOTES = [
    (
        "All servers load `benches/apps/bench_app.py` from the same venv and listen on a Unix socket; nginx reaches "
        "ferrule, uWSGI and gunicorn with `uwsgi_pass` (a new connection per request: the protocol has no keepalive) "
        "and granian with `proxy_pass` over HTTP/1.1 with a keepalive pool of 32."
    ),
    (
        "uWSGI: `--master --processes W --threads T --die-on-term --disable-logging` (it logs every request "
        "otherwise; the others do not)."
    ),
    (
        "gunicorn: `--protocol uwsgi --worker-class gthread --keep-alive 0 --no-control-socket`. With its default "
        "keep-alive, gunicorn 27 waits for a second request on each uwsgi connection, reads nginx's close and logs "
        "an error with a traceback for every request (about 3x slower)."
    ),
    "granian: `--interface wsgi --http 1 --blocking-threads T --uds`.",
    (
        "nginx: `uwsgi_max_temp_file_size 0` and `proxy_max_temp_file_size 0`, so big responses flow through its "
        "memory buffers instead of temp files; `client_body_buffer_size 2m` keeps the 1 MiB POST in memory; the "
        "ceiling's 64 KiB and 50 MB answers are static files sent with `sendfile on`."
    ),
]


TLS_NOTE = (
    "TLS scenario: a second instance of ferrule (`--socket tls://127.0.0.1:P --tls-cert --tls-key`, plus "
    "`--metrics` on a Unix socket to read its handshake counters) and of uWSGI (`--ssl-socket 127.0.0.1:P,CRT,KEY`), "
    "same workers and threads, no client certificate asked; nginx `uwsgi_pass suwsgi://` with `uwsgi_ssl_protocols "
    "TLSv1.2 TLSv1.3`, `uwsgi_ssl_session_reuse on`, `uwsgi_ssl_verify on` and `uwsgi_ssl_name localhost` against "
    "a private CA (deploy/make-certs: EC P-256, SANs DNS:localhost, IP:127.0.0.1). CPU/req includes the server's "
    "TLS work; nginx's side of it is in nginx CPU."
)


def _write_csvs(out: Path, rows: list[dict], runs: list[Run]) -> None:
    with open(out / "latest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(v) for k, v in r.items()})
    with open(out / "latest-runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        fields = list(Run.__dataclass_fields__)
        w.writerow(fields)
        for r in runs:
            w.writerow([csv_value(v) for v in (getattr(r, k) for k in fields)])


def write_outputs(
    args, rows: list[dict], runs: list[Run], backends: list[Backend], problems: list[str], notes: dict[str, list[str]]
) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csvs(out, rows, runs)
    settings = (
        f"{args.workers} workers × {args.threads} threads per server, nginx `worker_processes {args.nginx_workers}`, "
        f"wrk {args.wrk_threads} threads, {args.connections} connections ({FILE_CONNECTIONS} for the file), "
        f"{args.rounds} round(s) × {args.duration} s per server and scenario, servers in turn "
        f"({' '.join(server_names(backends))}), medians across rounds."
    )
    md = [
        "# ferrule benchmark",
        "",
        "Generated by `benches/run`" + (" --quick" if args.quick else "") + ". " + settings,
        "",
        (
            "CPU is the user+system time of the server's whole process tree (master and workers) during the run, "
            "divided by the requests served; nginx's own CPU is shown apart. RSS and PSS are per worker process: "
            "idle after start-up, and the peak of the workers' mean during the load (PSS splits pages shared "
            "after fork between the processes that share them)."
        ),
        "",
        results_tables(rows, backends, args, notes),
        "",
        "### How each server runs",
        "",
        *[f"- {note}" for note in SETUP_NOTES + ([TLS_NOTE] if any(sc.tls for sc in SCENARIOS) else [])],
        "",
        "### Machine and versions",
        "",
        md_table(["", ""], [[k, v] for k, v in machine_info(args, backends)], numeric=False),
    ]
    try:
        draw_chart(out / "latest.png", rows, backends)
    except Exception as e:  # noqa: BLE001  (a missing or broken matplotlib must not lose the numbers)
        problems.append(f"chart not drawn: {e}")
    if problems:
        md += ["", "### Problems", ""] + [f"- {p}" for p in problems]
    text = "\n".join(md) + "\n"
    (out / "latest.md").write_text(text)
    return text


def draw_chart(path: Path, rows: list[dict], backends: list[Backend]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    scenarios = [sc.name for sc in SCENARIOS if any(r["scenario"] == sc.name for r in rows)]
    peers = [n for n in server_names(backends) if n not in ("ferrule", "nginx")]
    servers = [n for n in server_names(backends) if n != "nginx"]
    ceiling_scenarios = [s for s in scenarios if any(r["scenario"] == s and r["server"] == "nginx" for r in rows)]

    def value(scenario, server, key):
        r = next((x for x in rows if x["scenario"] == scenario and x["server"] == server), None)
        return (r or {}).get(key) or 0.0

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(scenarios), 1)
    for i, sc in enumerate(scenarios):
        xs = [p + (i - (len(scenarios) - 1) / 2) * width for p in range(len(peers))]
        ax1.bar(xs, [value(sc, p, "ferrule_over_rps") for p in peers], width, label=sc)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    # Ratios on a log scale, so that twice as fast and half as fast are the same distance from 1.
    ax1.set_yscale("log", base=2)
    ratios = [value(sc, p, "ferrule_over_rps") for sc in scenarios for p in peers]
    lo, hi = min([1.0, *[r for r in ratios if r > 0]]), max([1.0, *ratios])
    ax1.set_ylim(lo / 1.15, hi * 1.15)
    ax1.set_yticks(
        [t for t in (0.125, 0.25, 0.5, 0.67, 0.8, 1, 1.25, 1.5, 2, 3, 4, 8, 16) if lo / 1.15 <= t <= hi * 1.15]
    )
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.set_xticks(range(len(peers)), [f"vs {p}" for p in peers])
    ax1.set_ylabel("ferrule req/s ÷ peer req/s (above 1: ferrule faster)")
    ax1.set_title("ferrule's throughput relative to each peer")
    ax1.legend(fontsize=8, ncol=2)

    width = 0.8 / max(len(servers), 1)
    for i, s in enumerate(servers):
        xs = [p + (i - (len(servers) - 1) / 2) * width for p in range(len(ceiling_scenarios))]
        ax2.bar(xs, [value(sc, s, "of_ceiling") for sc in ceiling_scenarios], width, label=s)
    ax2.set_xticks(range(len(ceiling_scenarios)), ceiling_scenarios)
    ax2.set_ylabel("fraction of nginx answering itself")
    ax2.set_title("Throughput as a fraction of the nginx ceiling")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
