"""`python -m pipeline.cli`: the same as the `maskdiet` command."""

from pipeline.cli import main

main()
