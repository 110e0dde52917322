"""An app with an atexit handler, for the test that a worker runs it on a graceful stop."""

import atexit
import os

MARKER = os.environ["FERRULE_TEST_ATEXIT_FILE"]


@atexit.register
def _say_goodbye():
    with open(MARKER, "a") as f:
        f.write(f"atexit ran in {os.getpid()}\n")


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
