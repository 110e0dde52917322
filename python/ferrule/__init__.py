"""ferrule: a WSGI server for Python web apps behind nginx, speaking only the uwsgi protocol.

Everything but the entry point is in the Rust extension module ``ferrule._ferrule``; run ``ferrule --help``.
"""

from ferrule._ferrule import __version__

__all__ = ["__version__"]
