"""`python -m flowerfeat` (and `torchrun -m flowerfeat`) run the CLI."""

from flowerfeat.cli import main

main()
