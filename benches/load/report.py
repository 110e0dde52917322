"""The load benchmark's report: tables on stdout and in NAME.md, NAME.csv, NAME-runs.csv and NAME.png (NAME is
`latest` unless --name says otherwise), one section per thread count."""

from __future__ import annotations

import csv
from pathlib import Path

from harness.report import csv_value, fmt, md_table, ratio
from harness.versions import machine_rows, package_version, run_quiet

from .chart import draw_chart
from .pairs import pair_ratios, pairs_table
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
    head = ["scenario", "peer", "req/s", "p50", "p99", "worker CPU/req", "tree CPU/req", "RSS/worker (load)",
            "RSS/worker (idle)"]  # fmt: skip
    body = []
    for sc in SCENARIOS:
        for n in servers:
            if n == "ferrule":
                continue
            r = next((x for x in rows if x["scenario"] == sc.name and x["server"] == n), None)
            if r:
                body.append([sc.name, n] + [ratio(r[f"ferrule_over_{m}"]) for m in RATIO_METRICS])
    return (
        "### ferrule / peer, medians\n\nEach cell is ferrule's median divided by the peer's: above 1 is better for "
        "req/s, below 1 is better for latency, CPU and memory.\n\n" + md_table(head, body)
    )


def _scenario_tables(rows: list[dict], args, notes: list[str], threads: int) -> list[str]:
    """Every metric, one table per scenario."""
    head = ["server", "req/s", "of nginx", "p50 ms", "p99 ms", "failed", "worker CPU µs/req", "tree CPU µs/req",
            "nginx CPU µs/req", "RSS MiB/worker load", "RSS MiB/worker idle", "PSS MiB/worker load"]  # fmt: skip
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
                    fmt(r["worker_cpu_us_per_req"], 0),
                    fmt(r["cpu_us_per_req"], 0),
                    fmt(r["nginx_cpu_us_per_req"], 0),
                    fmt(r["rss_mib"], 1),
                    fmt(r["idle_rss_mib"], 1),
                    fmt(r["pss_mib"], 1),
                ]
            )
        conns = sc.connections or args.connections
        text = f"### {sc.name}, {threads} {_threads(threads)}: {sc.description}, {conns} connections\n\n"
        text += md_table(head, body)
        if notes.get((threads, sc.name)):
            text += "\n\n" + "\n".join(f"- {n}" for n in notes[(threads, sc.name)])
        parts.append(text)
    return parts


def _threads(n: int) -> str:
    return "thread" if n == 1 else "threads"


def results_tables(
    rows: list[dict], runs: list[Run], backends: dict[int, list[Backend]], args, notes: dict
) -> str:
    """One section per thread count: throughput, ratios of the medians, pair ratios, a table per scenario."""
    parts = []
    for threads, mine in backends.items():
        these = [r for r in rows if r["threads"] == threads]
        if not these:
            continue
        names = server_names(mine)
        servers = [n for n in names if n != "nginx"]
        parts += [
            f"## {args.workers} {'worker' if args.workers == 1 else 'workers'} × {threads} {_threads(threads)}",
            _throughput_table(these, names),
            _ratio_table(these, servers),
            pairs_table(pair_ratios(runs, threads, [n for n in servers if n != "ferrule"])),
            *_scenario_tables(these, args, notes, threads),
        ]
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
    info.append(("django", package_version(args.venv, "django")))
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
        "flask and django: the same view in each framework, a JSON document of the path, the `X-Bench-Client` header "
        "and the query string. The Django view is `benches/apps/djsite`'s `/django/json` (mounted by bench_app, "
        "imported on the first request) under the site's whole middleware stack (security, sessions, common, CSRF, "
        "auth, messages, clickjacking); it reads neither the session nor the user, so no request touches the "
        "database."
    ),
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


def _write_csvs(out: Path, name: str, rows: list[dict], runs: list[Run]) -> None:
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_value(v) for k, v in r.items()})
    with open(out / f"{name}-runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        fields = list(Run.__dataclass_fields__)
        w.writerow(fields)
        for r in runs:
            w.writerow([csv_value(v) for v in (getattr(r, k) for k in fields)])


def _command(args) -> str:
    """How the run was asked for, as far as the presets go."""
    return "`benches/run" + (" --per-worker" if args.per_worker else "") + (" --quick" if args.quick else "") + "`"


def write_outputs(
    args, rows: list[dict], runs: list[Run], backends: dict[int, list[Backend]], problems: list[str], notes: dict
) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csvs(out, args.name, rows, runs)
    first = next(iter(backends.values()))
    threads = ", ".join(str(n) for n in backends)
    settings = (
        f"{args.workers} {'worker' if args.workers == 1 else 'workers'} × {threads} threads per server (the servers "
        f"restarted for each thread count), nginx `worker_processes {args.nginx_workers}`, `wrk -t{args.wrk_threads}`, "
        f"{args.connections} connections ({FILE_CONNECTIONS} for the file), {args.warmup} s of warm-up, "
        f"then {args.rounds} round(s) × {args.duration} s per server and scenario, servers in turn "
        f"({' '.join(server_names(first))}), medians across rounds."
    )
    md = [
        "# ferrule benchmark",
        "",
        f"Generated by {_command(args)}. " + settings,
        "",
        (
            "Worker CPU is the user+system time of the server's workers during the run (its process tree minus the "
            "master's own time; a worker that exits is counted through its master's reaped-children time), divided "
            "by the requests served; tree CPU adds the master's own. nginx's own CPU is shown apart. RSS and PSS are "
            "per worker process: idle after start-up, and the peak of the workers' mean during the load (PSS splits "
            "pages shared after fork between the processes that share them)."
        ),
        "",
        results_tables(rows, runs, backends, args, notes),
        "",
        "## How each server runs",
        "",
        *[f"- {note}" for note in SETUP_NOTES + ([TLS_NOTE] if any(sc.tls for sc in SCENARIOS) else [])],
        *(["- **This run logs every request** (`--request-logs`): ferrule with `--access-log`, uWSGI without "
           "`--disable-logging`, each into its log file."] if args.request_logs else []),
        "",
        "## Machine and versions",
        "",
        md_table(["", ""], [[k, v] for k, v in machine_info(args, first)], numeric=False),
    ]
    try:
        draw_chart(out / f"{args.name}.png", rows, server_names(first), list(backends))
    except Exception as e:  # noqa: BLE001  (a missing or broken matplotlib must not lose the numbers)
        problems.append(f"chart not drawn: {e}")
    if problems:
        md += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    text = "\n".join(md) + "\n"
    (out / f"{args.name}.md").write_text(text)
    return text
