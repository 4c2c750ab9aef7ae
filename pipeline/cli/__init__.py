"""The `pipeline` command (the top layer): workers, submit, status, cost, dlq and the demo.

`pipeline.cli.main` builds the command; the other modules are its sub-commands and views.
"""
