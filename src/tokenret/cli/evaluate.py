"""``tokenret evaluate`` (mAP / mP@k on Revisited Oxford and Paris, +R1M) and ``tokenret show-results``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tokenret.cli.common import (
    add_aggregator_arguments,
    add_extraction_arguments,
    add_local_arguments,
    add_model_arguments,
    extraction_config_from_args,
    local_config_from_args,
    local_model_from_args,
    model_from_args,
    set_interrupt_hint,
    set_model_from_args,
)

__all__ = ["add_parser", "add_rerank_arguments", "aggregator_from_args", "image_path", "rerank_from_args"]


def add_rerank_arguments(p: argparse.ArgumentParser, what: str, excludes: str) -> None:
    """``--rerank superglobal`` and its ``--rerank-m/-k/-beta``.

    ``what`` names the ranking re-ranked and ``excludes`` the options it refuses, for the help.
    """
    g = p.add_argument_group("re-ranking")
    g.add_argument(
        "--rerank",
        choices=["superglobal"],
        default=None,
        help=f"re-rank the top M of {what} with SuperGlobal's re-ranking (MDescAug + RerankwMDA, ICCV 2023), "
        f"from the global vectors alone; it does its own query expansion, so it refuses {excludes}",
    )
    g.add_argument(
        "--rerank-m", type=int, default=None, metavar="M", help="candidates re-ranked (default 400)"
    )
    g.add_argument(
        "--rerank-k", type=int, default=None, metavar="K", help="neighbours per candidate (default 9)"
    )
    g.add_argument(
        "--rerank-beta", type=float, default=None, metavar="BETA", help="neighbour weight (default 0.15)"
    )


def rerank_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~tokenret.rerank.SuperGlobalRerank` of ``--rerank superglobal``, or None."""
    from tokenret.rerank import SuperGlobalRerank

    given = {
        key: value
        for key, value in (("m", args.rerank_m), ("k", args.rerank_k), ("beta", args.rerank_beta))
        if value is not None
    }
    if args.rerank is None:
        if given:
            flags = ", ".join(f"--rerank-{key}" for key in given)
            raise ValueError(f"{flags} set without --rerank superglobal")
        return None
    return SuperGlobalRerank(**given)


def add_parser(subparsers: Any) -> None:
    """Register ``evaluate`` and ``show-results``."""
    p = subparsers.add_parser("evaluate", help="mAP / mP@k on Revisited Oxford and Paris (+R1M)")
    add_model_arguments(p)
    p.add_argument("--data-root", required=True, help="folder holding <dataset>/gnd_<dataset>.pkl and jpg/")
    p.add_argument("--datasets", nargs="+", default=["roxford5k", "rparis6k"])
    p.add_argument(
        "--r1m", default=None, help="revisitop1m folder (revisitop1m.txt, jpg/): add 1M distractors"
    )
    p.add_argument("--qe", nargs=2, type=float, metavar=("K", "ALPHA"), help="alpha query expansion")
    p.add_argument("--dba", nargs=2, type=float, metavar=("K", "ALPHA"), help="database-side augmentation")
    add_rerank_arguments(p, "each query's ranking (R1M distractors included with --r1m)", "--qe/--dba")
    p.add_argument("--cache-dir", default=None, help="descriptor cache (default $TOKENRET_HOME/descriptors)")
    p.add_argument("--output", default="tokenret-evaluate.json", help="JSON report path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_extraction_arguments(p)
    add_local_arguments(p)
    add_aggregator_arguments(p, asmk=True)
    p.set_defaults(func=_cmd_evaluate)

    p = subparsers.add_parser("show-results", help="PNG of the top-k per query from an evaluate report")
    p.add_argument("--report", required=True, help="JSON written by `tokenret evaluate`")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--queries", type=int, nargs="*", help="query indices (default: the first 5)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--protocol", choices=["easy", "medium", "hard"], default="medium")
    p.add_argument("--out", default="results.png", help="picture file (no image extension: PNG, .png added)")
    p.set_defaults(func=_cmd_show_results)


def aggregator_from_args(args: argparse.Namespace) -> Any:
    """The aggregator of ``--aggregator asmk|vlad|token`` with its codebook or Token set model."""
    from tokenret.aggregate.aggregators import AsmkAggregator, TokenAggregator, VladAggregator
    from tokenret.aggregate.codebook import Codebook

    if args.aggregator is None:
        raise ValueError("--local needs --aggregator asmk, vlad or token")
    if args.aggregator == "token":
        return TokenAggregator(set_model_from_args(args), max_n=args.topk, device=args.device)
    if args.codebook is None and args.codebook_size is None:
        raise ValueError(
            f"--aggregator {args.aggregator} needs --codebook FILE (made by `tokenret codebook` on other "
            "images) or --codebook-size K (learned from the evaluated database)"
        )
    codebook = Codebook.load(args.codebook) if args.codebook else None
    if args.aggregator == "asmk":
        return AsmkAggregator(
            codebook,
            codebook_size=args.codebook_size,
            binary=not args.no_binary,
            alpha=args.alpha,
            tau=args.tau,
            query_assignment=args.query_assignment,
        )
    return VladAggregator(codebook, codebook_size=args.codebook_size, power=args.vlad_power)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from tokenret.benchmark import run_benchmark, run_local_benchmark
    from tokenret.evaluate import RERANK_WITH_QE_DBA

    qe = tuple(args.qe) if args.qe else None
    dba = tuple(args.dba) if args.dba else None
    rerank = rerank_from_args(args)
    if rerank is not None and (qe or dba):
        raise ValueError(RERANK_WITH_QE_DBA)
    cache = args.cache_dir or "$TOKENRET_HOME/descriptors"
    set_interrupt_hint(
        args, f"the descriptors finished so far are cached in {cache}: run the same command again to go on"
    )
    if args.local:
        aggregator = aggregator_from_args(args)
        report = run_local_benchmark(
            local_model_from_args(args),
            aggregator,
            args.data_root,
            args.datasets,
            local_config_from_args(args),
            r1m_root=args.r1m,
            qe=qe,
            dba=dba,
            cache_root=args.cache_dir,
            progress=not args.quiet,
            rerank=rerank,
        )
        report["local_checkpoint"] = args.local_checkpoint
    else:
        if args.aggregator:
            raise ValueError("--aggregator needs --local NAME (the local features to aggregate)")
        report = run_benchmark(
            model_from_args(args),
            args.data_root,
            args.datasets,
            extraction_config_from_args(args),
            r1m_root=args.r1m,
            qe=qe,
            dba=dba,
            cache_root=args.cache_dir,
            progress=not args.quiet,
            rerank=rerank,
        )
    report["checkpoint"] = args.checkpoint
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f">> report written to {out}")
    return 0


def image_path(out: str) -> Path:
    """``--out`` as a picture's path: one without an image extension (``evalshow``) gets ``.png``."""
    from PIL import Image

    path = Path(out)
    return (
        path if path.suffix.lower() in Image.registered_extensions() else path.with_name(path.name + ".png")
    )


def _cmd_show_results(args: argparse.Namespace) -> int:
    from tokenret.data.revisited import RevisitedDataset
    from tokenret.viz import result_grid

    report = json.loads(Path(args.report).read_text())
    entry = report["datasets"].get(args.dataset) or report["datasets"].get(args.dataset + "+R1M")
    if entry is None:
        raise ValueError(f"{args.report} has no results for {args.dataset!r}: {sorted(report['datasets'])}")
    ds = RevisitedDataset.from_root(args.data_root, args.dataset)
    queries = args.queries if args.queries else list(range(min(5, len(ds.qimlist))))
    bad = [q for q in queries if not 0 <= q < len(ds.qimlist)]
    if bad:
        raise ValueError(f"query indices {bad} out of range 0..{len(ds.qimlist) - 1}")
    grid = result_grid(ds, queries, entry["top_ranks"], args.protocol, args.top)
    out = image_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f">> wrote {out} ({len(queries)} queries x top {args.top}, {args.protocol} labels)")
    return 0
