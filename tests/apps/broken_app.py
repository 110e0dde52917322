"""An app whose import fails, for tests/it/lifecycle.rs: ferrule must stop with the traceback in its log."""


def _fail_while_importing():
    raise RuntimeError("lifecycle broken app: this import fails on purpose")


_fail_while_importing()


def application(environ, start_response):  # never reached
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"unreachable"]
