"""The ``patchnet`` command line: parses, then calls the modules that do the work.

``common`` holds the app and the session every command runs in; ``run`` trains, evaluates and
predicts; ``deploy`` localises and exports; ``data`` looks at datasets and caches; ``study`` the
trunk's features.
"""

from __future__ import annotations

from . import data, deploy, run, study  # noqa: F401  (each registers its commands on the app)
from .common import Skipped, app, session

__all__ = ["Skipped", "app", "main", "session"]


def main() -> None:
    app()  # typer's app exits the process itself
