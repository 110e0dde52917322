"""The machinery the benchmark scripts (bench.py, memory.py, worker_profile.py) share; each script holds only its
own scenarios.

Its modules:

    processes     start a server in its own process group, stop it by that group, logs, stop signals
    procfs        /proc readings: process trees, CPU time, RSS, PSS, smaps_rollup
    servers       the command lines of ferrule, uWSGI, gunicorn and granian
    nginx         the generated nginx.conf, starting nginx, one request through it
    wrk           running wrk and reading its output
    uwsgi_client  one request at a time straight to a server's socket, as nginx's uwsgi_pass sends it
    profilers     reading what perf, callgrind and strace write
    tls           the private CA, and what a uwsgi-over-TLS server negotiates and resumes
    versions      versions of the servers and tools, and the machine, for the reports
    report        number formats and markdown tables
"""

from pathlib import Path

BENCHES = Path(__file__).resolve().parent.parent
REPO = BENCHES.parent
# The apps every server loads (bench_app.py, djsite), run from this folder.
APPS = BENCHES / "apps"
