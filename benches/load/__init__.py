"""The load benchmark's own parts; benches/bench.py runs them, on the shared machinery of benches/harness.

Its modules:

    scenarios  what is measured: the requests, and which of them nginx can answer itself
    servers    the servers under test behind nginx (Unix socket and TLS instances): their config, readiness, restarts
    runs       one wrk run with its CPU and memory readings, and the medians across rounds
    report     the tables, the chart and the results files
"""
