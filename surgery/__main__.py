"""`python -m surgery`: the `vsurgery` command line."""

from .cli.app import main

main()
