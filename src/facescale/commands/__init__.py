"""Subcommands of the `facescale` command line, one module each."""
