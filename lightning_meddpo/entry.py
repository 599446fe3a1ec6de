"""`python -m lightning_meddpo`: the programs that neither train nor evaluate start without Lightning.

build-pairs, convert, export and plan parse their own options and run at once (`--help` in about a second);
everything else (fit / validate / test / predict, benchmark, the top-level `--help` listing every subcommand) goes
through cli.py's one LightningCLI parser. Both report a user's error the same way: one line naming what to fix,
exit status 2; `--debug` (or LIGHTNING_MEDDPO_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import lightning_meddpo.demo  # noqa: F401  (registers tiny:// and the demo data, installed or not: registry.py)
from lightning_meddpo.llm import LLMError

DEBUG_ENV = "LIGHTNING_MEDDPO_DEBUG"
# What a user's input or machine can raise: printed as one message (an OSError: a missing or unwritable path, a
# full disk; our writers name the path, see checkpoints.WriteError; a judge or rewriter server that failed for good,
# named with its URL and status). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, LLMError)
# The programs that start without Lightning: subcommand -> its module (build_parser(), run(namespace)).
LIGHT_PROGRAMS = {
    "build-pairs": "lightning_meddpo.commands.build_pairs",
    "convert": "lightning_meddpo.commands.convert",
    "export": "lightning_meddpo.commands.export",
    "plan": "lightning_meddpo.commands.plan",
}


def guarded(argv: list[str], run: Callable[[list[str]], Any]) -> Any:
    """`run(argv)` with `--debug` taken out; a USER_ERRORS exception becomes one line on stderr and exit 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = "--debug" in argv or bool(os.environ.get(DEBUG_ENV))
    argv = [a for a in argv if a != "--debug"] or ["--help"]
    try:
        return run(argv)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"lightning_meddpo {argv[0]}: error: {e}\n(the full traceback: add --debug, or set {DEBUG_ENV}=1)",
              file=sys.stderr)
        raise SystemExit(2) from None


def run_light_program(argv: list[str]) -> Any:
    """One of LIGHT_PROGRAMS: its own parser (the same one cli.py adds as a subcommand), then its run()."""
    program = importlib.import_module(LIGHT_PROGRAMS[argv[0]])
    parser = program.build_parser()
    parser.prog = f"python -m lightning_meddpo {argv[0]}"
    return program.run(parser.parse_args(argv[1:]))


def main(args: list[str] | None = None) -> Any:
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in LIGHT_PROGRAMS:
        return guarded(argv, run_light_program)
    from lightning_meddpo.cli import main as cli_main

    return cli_main(argv)
