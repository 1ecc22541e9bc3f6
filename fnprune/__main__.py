"""`python -m fnprune` runs the CLI."""

from .cli import main

main()
