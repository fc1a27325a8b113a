"""The ``tokenret`` command: one subcommand per job, one module per family of jobs.

* :mod:`~tokenret.cli.models`: ``models``, ``info``
* :mod:`~tokenret.cli.evaluate`: ``evaluate``, ``show-results``
* :mod:`~tokenret.cli.local`: ``extract-local``, ``delf-pca``, ``codebook``
* :mod:`~tokenret.cli.collection`: ``index``, ``search``, ``show``, ``duplicates``, ``serve``
* :mod:`~tokenret.cli.train`: ``train``
* :mod:`~tokenret.cli.export`: ``export``
* :mod:`~tokenret.cli.common`: the argument groups they share and the error handling

Example:
    >>> from tokenret.cli import main
    >>> main(["models", "token_*"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse

from tokenret.cli import collection, evaluate, export, local, models, train
from tokenret.cli.common import (
    add_verbose_argument,
    extraction_config_from_args,
    local_config_from_args,
    parse_key_values,
    run_parsed,
    runtime_from_args,
)

__all__ = [
    "build_parser",
    "extraction_config_from_args",
    "local_config_from_args",
    "main",
    "parse_key_values",
    "runtime_from_args",
]

# The order of `tokenret --help`.
_FAMILIES = (models, evaluate, local, collection, train, export)


def build_parser() -> argparse.ArgumentParser:
    """The ``tokenret`` parser: each family module adds its subcommands."""
    parser = argparse.ArgumentParser(prog="tokenret", description="Token-based image retrieval.")
    add_verbose_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for family in _FAMILIES:
        family.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tokenret`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return run_parsed(build_parser().parse_args(argv))
