"""`python -m lightning_meddpo ...` runs the CLI (entry.py: the light programs start without Lightning)."""

from lightning_meddpo.entry import main

main()
