"""The folder index: ``tokenret index`` (make, update or report on one), ``search``, ``show``,
``duplicates`` and ``serve``.

Every call the command line makes into :mod:`tokenret.collection` is in this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokenret.cli.common import (
    add_aggregator_arguments,
    add_device_argument,
    add_extraction_arguments,
    add_local_arguments,
    add_model_arguments,
    add_runtime_arguments,
    extraction_config_from_args,
    local_model_from_args,
    model_from_args,
    parse_key_values,
    runtime_from_args,
    set_interrupt_hint,
    set_model_from_args,
)
from tokenret.cli.evaluate import add_rerank_arguments, rerank_from_args

__all__ = ["add_parser", "describe_index_model", "index_model_from_args", "local_pipeline_from_args"]


def add_parser(subparsers: Any) -> None:
    """Register ``index``, ``search``, ``show``, ``duplicates`` and ``serve``."""
    p = subparsers.add_parser("index", help="index a folder of images (incremental), or report on an index")
    p.add_argument("target", help="PHOTOS folder to index (with --out), or an INDEX to report on")
    p.add_argument("--out", help="index directory to create or update")
    p.add_argument("--report", action="store_true", help="list settings and unreadable files")
    p.add_argument(
        "--repair",
        action="store_true",
        help="check every stored vector against its checksum and describe again those missing or damaged",
    )
    p.add_argument(
        "--check-recall", action="store_true", help="recall@k of the index's search backend vs exact search"
    )
    p.add_argument(
        "--backend",
        default=None,
        help="search backend to record: auto (new indexes: exact up to 200k images, then IVF-PQ), exact, "
        "a FAISS factory string such as HNSW32 or IVF4096_HNSW32,PQ64, or a Qdrant collection for search "
        "beyond one machine: qdrant:http://HOST:6333[#COLLECTION] (a server or cluster) or "
        "qdrant:FOLDER[#COLLECTION] (Qdrant's local mode)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="K",
        help="re-score the best K FAISS candidates exactly against the stored vectors (0: off)",
    )
    p.add_argument("-k", "--k", type=int, default=100, help="k for --check-recall")
    p.add_argument("--n-queries", type=int, default=100, help="sampled queries for --check-recall")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(p)
    add_extraction_arguments(p)
    add_local_arguments(p)
    add_aggregator_arguments(p, asmk=False)
    p.set_defaults(func=_cmd_index)

    p = subparsers.add_parser("search", help="search an index with query images (or folders of them)")
    p.add_argument("index")
    p.add_argument("queries", nargs="+", help="query images or folders")
    p.add_argument("--box", help="x0,y0,x1,y1: search with this region of the query")
    p.add_argument("-k", "--k", type=int, default=20)
    p.add_argument("--qe", type=int, nargs="?", const=5, default=0, help="alpha query expansion over N hits")
    add_rerank_arguments(p, "the search's results (from whatever backend the index uses)", "--qe")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    add_model_arguments(p)
    p.set_defaults(model=None)  # the index's own model, unless --model says otherwise
    add_runtime_arguments(p)
    p.set_defaults(func=_cmd_search)

    p = subparsers.add_parser(
        "show", help="PNG + HTML page of a search, with the query's token attention maps"
    )
    p.add_argument("index")
    p.add_argument("query")
    p.add_argument("--box", help="x0,y0,x1,y1")
    p.add_argument("-k", "--k", type=int, default=10)
    p.add_argument("--out", default="tokenret-show", help="output folder")
    add_runtime_arguments(p)
    p.set_defaults(func=_cmd_show)

    p = subparsers.add_parser("duplicates", help="groups of near-duplicate images in an index")
    p.add_argument("index")
    p.add_argument("--threshold", type=float, default=0.9, help="cosine similarity for 'near-duplicate'")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_duplicates)

    p = subparsers.add_parser("serve", help="HTTP API and web page to search an index")
    p.add_argument("index")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: all interfaces; warns unless an API key is set)",
    )
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one)")
    p.add_argument("--checkpoint", help="the index's weights, if the recorded file moved")
    p.add_argument(
        "--api-key",
        help="require this key on every request (X-API-Key, Bearer, or HTTP Basic password; "
        "default: $TOKENRET_API_KEY)",
    )
    p.add_argument("--max-upload-mb", type=float, default=32, help="largest upload, in MB (default 32)")
    p.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="most pixels of an uploaded image (default 40M)"
    )
    p.add_argument("--max-batch", type=int, default=8, help="most queries described together (default 8)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="most searches waiting; more are answered 503 (default 64)"
    )
    p.add_argument(
        "--max-connections", type=int, default=256, help="connections at once; more get 503 (default 256)"
    )
    p.add_argument(
        "--timeout", type=float, default=60, help="seconds an upload may take to arrive (default 60)"
    )
    add_device_argument(p)
    p.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        default=None,
        help="what runs the global network for queries: always the engine the index was made with "
        "(given, it must be that one)",
    )
    p.set_defaults(func=_cmd_serve)


def local_pipeline_from_args(args: argparse.Namespace) -> Any:
    """--local NAME --aggregator token|vlad as one image model (for indexes of your own photos)."""
    from tokenret.aggregate.codebook import Codebook
    from tokenret.aggregate.pipeline import LocalAggregateModel

    if args.aggregator == "token":
        aggregator = set_model_from_args(args)
    elif args.aggregator == "vlad":
        if not args.codebook:
            raise ValueError("--aggregator vlad needs --codebook FILE (made by `tokenret codebook`)")
        aggregator = Codebook.load(args.codebook)
    else:
        raise ValueError(
            "an index of local features needs --aggregator token or vlad (one vector per image); ASMK keeps "
            "an inverted file of its own: use `tokenret evaluate --local ... --aggregator asmk`"
        )
    return LocalAggregateModel(
        local_model_from_args(args),
        aggregator,
        scales=args.scales,
        topk=args.topk,
        vlad_power=args.vlad_power,
    )


def describe_index_model(index: Any) -> str:
    """What an index's descriptors were made with, e.g. "token_r50 {'backbone': 'resnet18'} from best.pth"."""
    s = index.settings
    kwargs = f" {s['model_kwargs']}" if s.get("model_kwargs") else ""
    return f"{s['model']}{kwargs} from {s['checkpoint']} (sha256 {str(s.get('checkpoint_sha256'))[:12]}...)"


def check_engine(args: argparse.Namespace, index: Any) -> None:
    """Refuse an ``--engine`` other than the one the index's descriptors were made with."""
    made_with = index.settings["extraction"].get("engine", "torch")
    engine = getattr(args, "engine", None)
    if engine is not None and engine != made_with:
        raise ValueError(
            f"--engine {engine}: {index.path} holds descriptors made with the {made_with} engine, and "
            "queries are described the same way; leave out --engine, or make a new index with "
            f"--engine {engine}"
        )


def index_model_from_args(args: argparse.Namespace, index: Any) -> Any:
    """The index's own model, or the one ``--model/--model-arg/--checkpoint/--pretrained`` give once checked
    to be the index's: anything else is refused (a ValueError naming what the index holds), since queries
    described another way are not comparable with the stored descriptors."""
    from tokenret.collection import IndexMismatchError
    from tokenret.models.checkpoints import CheckpointError

    s = index.settings
    check_engine(args, index)
    holds = f"{index.path} holds descriptors of {describe_index_model(index)}"
    fix = "leave out --model/--model-arg/--checkpoint/--pretrained to use it, or make a new index with yours"
    if getattr(args, "model", None) and args.model != s["model"]:
        raise ValueError(f"--model {args.model}: {holds}; {fix}")
    recorded = s.get("model_kwargs") or {}
    differ = {
        k: v for k, v in parse_key_values(getattr(args, "model_arg", None)).items() if recorded.get(k) != v
    }
    if differ:
        flags = " ".join(f"{k}={v}" for k, v in differ.items())
        raise ValueError(f"--model-arg {flags}: {holds}; {fix}")
    checkpoint, pretrained = getattr(args, "checkpoint", None), getattr(args, "pretrained", False)
    if not (checkpoint or pretrained):
        return index.load_model()
    flag = f"--checkpoint {checkpoint}" if checkpoint else "--pretrained"
    try:
        if checkpoint:  # a copy of the index's weights (the recorded file moved): built as the index's model
            return index.load_model(checkpoint)
        model = model_from_args(argparse.Namespace(**{**vars(args), "model": s["model"]}))
        index.bind(model)
        return model
    except (IndexMismatchError, CheckpointError):
        raise ValueError(f"{flag} holds other weights: {holds}; {fix}") from None


def _cmd_index(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex, IndexDamagedError

    target = Path(args.target)
    set_interrupt_hint(
        args, "the images described before the last commit are kept: run the same command again to go on"
    )
    if args.out is None:  # `tokenret index INDEX --report / --check-recall / --backend / --repair`
        with ImageIndex(target, check=False) as index:
            if args.repair:
                model = index_model_from_args(args, index)
                counts = index.repair(model, progress=not args.quiet, **runtime_from_args(args))
                print(
                    f">> repaired {counts['repaired']}, unreadable {counts['failed']}; "
                    f"{len(index)} images searchable"
                )
                print(f">> {index.verify().describe(index.path)}")
                return 0
            store = index.verify(full=False)
            if not store.ok:
                raise IndexDamagedError(store.describe(index.path))
            if index.ann_status() in ("stale", "missing"):  # the explicit step searches leave to `index`
                index.update_ann()
                if not args.json:
                    print(f">> approximate index brought up to date: {_describe_backend(index)}")
            if args.backend is not None or args.refine is not None:
                backend = args.backend or index.backend
                index.set_backend(backend, _refine_from_args(args, backend, index.refine))
                if not args.json:
                    print(f">> search: {_describe_backend(index)}")
                elif not (args.check_recall or args.report):
                    print(json.dumps(_backend_info(index), indent=1))
                if not (args.check_recall or args.report):
                    return 0
            if args.check_recall:
                from tokenret.collection import sampled_recall

                res = sampled_recall(index, k=args.k, n_queries=args.n_queries)  # the configured backend
                refine = f" (exact re-ranking of {res['refine']})" if res["refine"] else ""
                print(
                    json.dumps(res, indent=1)
                    if args.json
                    else f">> recall@{res['k']} of {res['spec']}{refine} vs exact on {res['n_queries']} "
                    f"stored images: {res['recall']:.4f}"
                )
                return 0
            failures = index.failures()
            if args.json:
                print(
                    json.dumps(
                        {
                            "images": len(index),
                            "failed": [list(f) for f in failures],
                            "settings": index.settings,
                            "search": _backend_info(index),
                        },
                        indent=1,
                    )
                )
            else:
                s = index.settings
                print(f"index:      {index.path}")
                print(f"model:      {s['model']} {s['model_kwargs']} ({s['checkpoint']})")
                print(f"extraction: {s['extraction']}")
                print(f"images:     {len(index)} searchable, {len(failures)} unreadable")
                print(f"search:     {_describe_backend(index)}")
                for path, reason in failures:
                    print(f"  unreadable: {path}: {reason}")
        return 0
    out = Path(args.out)
    if (out / "meta.sqlite").exists():
        index = ImageIndex(out)
        model = index_model_from_args(args, index)
        if args.backend is not None or args.refine is not None:
            backend = args.backend or index.backend
            # recorded now, built once at the end of the sync below
            index.set_backend(backend, _refine_from_args(args, backend, index.refine), build=False)
    else:
        config = extraction_config_from_args(args)
        if args.local:  # local features + aggregator: one model, saved inside the index
            model, checkpoint = local_pipeline_from_args(args), None
            config.scales = (1.0,)  # the local network runs its own pyramid
        else:
            model, checkpoint = model_from_args(args), args.checkpoint
        backend = args.backend or "auto"
        index = ImageIndex.create(
            out,
            model,
            config,
            checkpoint=checkpoint,
            backend=backend,
            refine=_refine_from_args(args, backend, None),
            exist_ok=True,  # another `tokenret index` may be creating it right now: then it is opened
        )
    with index:
        counts = index.sync(target, model, progress=not args.quiet, **runtime_from_args(args))
        print(">> " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; {len(index)} images searchable")
        if counts["unchanged"] and (counts["added"] or counts["updated"]):
            print(f">> kept {counts['unchanged']} image(s) described before (an earlier or interrupted run)")
        if counts["failed"]:
            print(f">> {counts['failed']} unreadable file(s): see `tokenret index {out} --report`")
        if index.backend_spec() != "exact":
            print(f">> search: {_describe_backend(index)}")
    return 0


def _refine_from_args(args: argparse.Namespace, backend: str, current: int | None) -> int | None:
    """--refine K (0: none); without it the current value stays, unless the backend becomes exact."""
    from tokenret.index import is_exact_spec

    if args.refine is not None:
        return args.refine or None
    return None if is_exact_spec(backend) else current


def _backend_info(index: Any) -> dict[str, object]:
    from tokenret.collection import default_qdrant_collection, qdrant_target

    info = {
        "backend": index.backend,
        "spec": index.backend_spec(),
        "refine": index.refine,
        "ann": index.ann_status(),
    }
    target = qdrant_target(info["spec"])
    if target is not None:
        info["qdrant_collection"] = target["collection"] or default_qdrant_collection(index.path)
    return info


def _describe_backend(index: Any) -> str:
    """E.g. 'HNSW32, exact re-ranking of 200 candidates; approximate index current'."""
    info = _backend_info(index)
    text = info["spec"] if info["spec"] == info["backend"] else f"{info['spec']} (backend {info['backend']})"
    if "qdrant_collection" in info:
        text += f" (collection {info['qdrant_collection']})"
    if info["refine"]:
        text += f", exact re-ranking of {info['refine']} candidates"
    if info["ann"] != "exact":
        text += f"; approximate index {info['ann']}"
    return text


def _parse_box(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    parts = [float(v) for v in text.replace(" ", "").split(",")]
    if len(parts) != 4:
        raise ValueError(f"--box takes x0,y0,x1,y1; got {text!r}")
    return tuple(parts)


def _cmd_search(args: argparse.Namespace) -> int:
    import csv

    from tokenret.collection import ImageIndex, find_images

    queries: list[Path] = []
    for q in args.queries:
        queries.extend(find_images(q))
    if not queries:
        raise FileNotFoundError(f"no query images in {args.queries}")
    rerank = rerank_from_args(args)
    if rerank is not None and args.qe:
        raise ValueError(
            "--rerank superglobal does not combine with --qe: SuperGlobal's re-ranking does its own query "
            "expansion; use one or the other"
        )
    rerank_options = {}
    if rerank is not None:
        rerank_options = {"rerank": "superglobal", "rerank_m": rerank.m, "rerank_k": rerank.k}
        rerank_options["rerank_beta"] = rerank.beta
    with ImageIndex(args.index) as index:
        model = index_model_from_args(args, index)  # descriptors must be made like the stored ones
        box = _parse_box(args.box)
        hits = index.search_images(
            queries,
            model,
            k=args.k,
            boxes=[box] * len(queries) if box else None,
            qe=args.qe,
            **rerank_options,
            **runtime_from_args(args),
        )
    rows = [
        (str(q), rank, h.path, round(h.score, 6))
        for q, hs in zip(queries, hits, strict=True)
        for rank, h in enumerate(hs, start=1)
    ]
    if args.json:
        print(
            json.dumps(
                {
                    str(q): [{"path": h.path, "score": h.score} for h in hs]
                    for q, hs in zip(queries, hits, strict=True)
                },
                indent=1,
            )
        )
    elif args.csv:
        w = csv.writer(sys.stdout)
        w.writerow(["query", "rank", "path", "score"])
        w.writerows(rows)
    else:
        for q, hs in zip(queries, hits, strict=True):
            print(f"{q}")
            for rank, h in enumerate(hs, start=1):
                print(f"  {rank:3d}  {h.score:.4f}  {h.path}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex
    from tokenret.viz import search_page

    box = _parse_box(args.box)
    with ImageIndex(args.index) as index:
        model = index.load_model()
        hits = index.search_images(
            [args.query], model, k=args.k, boxes=[box] if box else None, **runtime_from_args(args)
        )[0]
    png, page = search_page(args.query, hits, args.out, model=model, box=box)
    print(f">> wrote {png} and {page}")
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from tokenret.collection import ImageIndex, find_duplicate_groups

    with ImageIndex(args.index) as index:
        groups = find_duplicate_groups(index, args.threshold)
    if args.json:
        print(json.dumps(groups, indent=1))
    else:
        for i, g in enumerate(groups, start=1):
            print(f"group {i} ({len(g)} images)")
            for p in g:
                print(f"  {p}")
        print(f">> {len(groups)} group(s) of near-duplicates at similarity >= {args.threshold}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenret.serve import Limits, serve

    model = None
    if args.checkpoint or args.engine:  # refused before the server starts, in the command line's words
        from tokenret.collection import ImageIndex

        with ImageIndex(args.index) as index:
            model = index_model_from_args(args, index)  # checked: the server uses it (not built twice)
    try:
        serve(
            args.index,
            host=args.host,
            port=args.port,
            checkpoint=args.checkpoint,
            device=args.device,
            api_key=args.api_key,
            limits=Limits(body_timeout=args.timeout, max_connections=args.max_connections),
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            max_pixels=args.max_pixels,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            model=model,
        )
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        print(f"tokenret: error: cannot serve on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0
