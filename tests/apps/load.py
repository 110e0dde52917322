"""Bounded HTTP load for ferrule's lifecycle tests: TOTAL GET requests to 127.0.0.1:PORT/PATH from CONCURRENCY
threads, one connection per request, then one JSON line on stdout (stdlib only).

usage: load.py PORT PATH TOTAL CONCURRENCY

Output: {"ok": N, "failed": N, "statuses": {"200": N, ...}, "errors": [first few], "bodies": {body: count},
"elapsed_s": S}. A failure is any status other than 200 or any connection error. `bodies` counts distinct
response bodies (cut to 64 characters, at most 200 distinct), which tells a test which worker pids answered.
"""

import http.client
import json
import sys
import threading
import time

# Every socket operation gives up after this long, so a hung server ends the run instead of hanging the test.
IO_TIMEOUT_S = 30.0
MAX_ERRORS = 5
MAX_BODIES = 200


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    port, path, total, concurrency = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "failed": 0, "statuses": {}, "errors": [], "bodies": {}}

    def take():
        with lock:
            if state["next"] >= total:
                return None
            state["next"] += 1
            return state["next"]

    def record(status, body, error):
        with lock:
            if status is not None:
                key = str(status)
                state["statuses"][key] = state["statuses"].get(key, 0) + 1
            if status == 200 and error is None:
                state["ok"] += 1
            else:
                state["failed"] += 1
                if len(state["errors"]) < MAX_ERRORS:
                    state["errors"].append(error or f"status {status}: {body[:200]!r}")
            if body is not None:
                text = body[:64].decode("utf-8", "replace")
                if text in state["bodies"] or len(state["bodies"]) < MAX_BODIES:
                    state["bodies"][text] = state["bodies"].get(text, 0) + 1

    def worker():
        while take() is not None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT_S)
            try:
                conn.request("GET", path, headers={"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                record(resp.status, body, None)
            except Exception as e:  # any connection-level failure counts, with its description
                record(None, None, f"{type(e).__name__}: {e}")
            finally:
                conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = {k: state[k] for k in ("ok", "failed", "statuses", "errors", "bodies")}
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
