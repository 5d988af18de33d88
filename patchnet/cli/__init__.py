"""The ``patchnet`` command line: parses, then calls the modules that do the work.

``common`` holds the app and the session every command runs in; ``run`` trains, evaluates and
predicts; ``deploy`` localises and exports; ``data`` looks at datasets and caches; ``study`` the
trunk's features.
"""

# ruff: noqa: I001  (the imports below register the commands in the order --help lists them)
from __future__ import annotations

# each module registers its commands on the app; --help lists them in this order: train, eval, predict first
from . import run  # noqa: F401
from . import data, deploy, study  # noqa: F401
from .common import Skipped, app, session

__all__ = ["Skipped", "app", "main", "session"]


def main() -> None:
    app()  # typer's app exits the process itself
