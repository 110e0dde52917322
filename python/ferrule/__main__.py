"""The ``ferrule`` command and ``python -m ferrule``: hands the command line to the Rust core, which never
returns (the master and the workers leave with the process's exit status, without finalising Python)."""

import signal
import sys


def main() -> None:
    from ferrule import _ferrule

    # ferrule handles SIGINT itself (a fast stop); Python's handler would raise KeyboardInterrupt later, in
    # whatever Python code runs next.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _ferrule.main(sys.argv)


if __name__ == "__main__":
    main()
