"""`python -m lightning_meddpo ...` runs the CLI."""

from lightning_meddpo.cli import main

main()
