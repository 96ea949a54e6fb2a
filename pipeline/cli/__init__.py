"""The `maskdiet` command line: `app` with one module per command group.

Importing a command module registers its commands on `pipeline.cli.common.app`; `main` is the console
script. The shared options and the error contract live in `pipeline.cli.common`.
"""

from __future__ import annotations

import importlib

from pipeline.cli.common import app

# Importing a module registers its commands, in this order in `maskdiet --help`.
COMMAND_MODULES = ("data", "train", "run", "sweep", "jobs", "schedule")
for _module in COMMAND_MODULES:
    importlib.import_module(f"pipeline.cli.{_module}")


def main() -> None:
    app()


__all__ = ["app", "main"]
