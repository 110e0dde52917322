"""The load benchmark's own parts; benches/bench.py runs them, on the shared machinery of benches/harness.

Its modules:

    scenarios  what is measured: the requests, and which of them nginx can answer itself
    servers    the servers under test behind nginx (Unix socket and TLS instances): their config, readiness, restarts
    runs       one wrk run with its CPU (workers, whole tree, nginx) and memory readings, the medians across rounds
    pairs      ferrule against each peer round by round: each pair's ratios and their median
    report     the tables (a section per thread count) and the results files
    chart      the throughput chart
"""
