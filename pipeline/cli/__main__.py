"""`python -m pipeline.cli`: the same as the `pipeline` command."""

from pipeline.cli.main import main

main()
