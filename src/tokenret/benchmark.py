"""Run a model on Revisited Oxford/Paris (optionally +R1M): extract, rank, score, report.

This is what ``tokenret evaluate`` does. Descriptors are cached per dataset, model weights and extraction
settings (``$TOKENRET_HOME/descriptors`` by default), so changing only ranking options (QE, DBA, SuperGlobal
re-ranking) re-ranks without re-extracting, and an interrupted extraction resumes.

Example:
    >>> model = tokenret.create_model("token_r101", checkpoint="R101-Token.pth")        # doctest: +SKIP
    >>> report = run_benchmark(model, "data", ["roxford5k", "rparis6k"])               # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tokenret.data.revisited import R1MDistractors, RevisitedDataset
from tokenret.evaluate import (
    RERANK_WITH_QE_DBA,
    evaluate_descriptors,
    evaluate_scores,
    format_results,
    results_to_json,
)
from tokenret.extraction import ExtractionConfig, extract_descriptors, model_fingerprint
from tokenret.models.checkpoints import tokenret_home
from tokenret.models.convention import input_convention
from tokenret.rerank import SuperGlobalRerank

log = logging.getLogger(__name__)


def descriptor_cache_dir(cache_root: Path, model_fp: str, config: ExtractionConfig, what: str) -> Path:
    settings = hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root / what / f"{model_fp[:16]}-{settings}"


def run_benchmark(
    model: nn.Module,
    data_root: str | Path,
    datasets: Sequence[str],
    config: ExtractionConfig | None = None,
    r1m_root: str | Path | None = None,
    qe: tuple[int, float] | None = None,
    dba: tuple[int, float] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    cache_root: str | Path | None = None,
    progress: bool = True,
    print_fn=print,
    rerank: SuperGlobalRerank | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on each dataset; prints the release's lines and returns a JSON-ready report.

    ``rerank`` re-ranks each query's top ``m`` with SuperGlobal's re-ranking (not with ``qe``/``dba``);
    the report records it under ``rerank``.
    """
    if rerank is not None and (qe or dba):
        raise ValueError(RERANK_WITH_QE_DBA)
    config = config or ExtractionConfig.for_model(model)
    cache_root = Path(cache_root) if cache_root else tokenret_home() / "descriptors"
    model_fp = model_fingerprint(model)
    distractors = None
    if r1m_root is not None:
        r1m = R1MDistractors.from_root(r1m_root)
        out = descriptor_cache_dir(cache_root, model_fp, config, "revisitop1m")
        paths = r1m.image_paths()
        distractors = extract_descriptors(
            model, paths, None, config, out, progress=progress, desc="R1M"
        ).descriptors
    report = _new_report(model, model_fp, config.fingerprint(), qe, dba, distractors, rerank)
    for name in datasets:
        ds = RevisitedDataset.from_root(data_root, name)
        ds.check_images()
        db_paths = [ds.image_path(i) for i in range(len(ds.imlist))]
        q_paths = [ds.query_path(i) for i in range(len(ds.qimlist))]
        boxes = [ds.query_box(i) for i in range(len(ds.qimlist))]

        def describe(paths, boxes, what: str, label: str) -> np.ndarray:
            out = descriptor_cache_dir(cache_root, model_fp, config, what)
            return extract_descriptors(
                model, paths, boxes, config, out, progress=progress, desc=label
            ).descriptors

        db = describe(db_paths, None, f"{name}/db", f"{name} database")
        q = describe(q_paths, boxes, f"{name}/queries", f"{name} queries")
        if distractors is not None:
            db = np.concatenate([db, distractors])
        results, top = evaluate_descriptors(db, q, ds.gnd, ks, qe=qe, dba=dba, rerank=rerank)
        _report_dataset(report, name, ds, distractors is not None, results, top, print_fn)
    return report


def _new_report(model, model_fp: str, extraction: dict, qe, dba, distractors, rerank=None) -> dict[str, Any]:
    return {
        "model": getattr(model, "model_name", type(model).__name__),
        "model_kwargs": getattr(model, "model_kwargs", {}),
        "model_sha256": model_fp,
        "convention": input_convention(model).describe(),  # channel order, mean/std, size, scales, pooling
        "extraction": extraction,
        "qe": list(qe) if qe else None,
        "dba": list(dba) if dba else None,
        "rerank": rerank.settings() if rerank is not None else None,
        "r1m": len(distractors) if distractors is not None else 0,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "datasets": {},
    }


def _report_dataset(report, name, ds, with_r1m: bool, results, top, print_fn) -> None:
    label = name + ("+R1M" if with_r1m else "")
    for line in format_results(label, results):
        print_fn(line)
    report["datasets"][label] = {
        "n_db": len(ds.imlist),
        "n_queries": len(ds.qimlist),
        "results": results_to_json(results),
        "top_ranks": top.T.tolist(),  # per query, database indices best first
    }


def run_local_benchmark(
    local_model: nn.Module,
    aggregator: Any,
    data_root: str | Path,
    datasets: Sequence[str],
    config: Any = None,
    r1m_root: str | Path | None = None,
    qe: tuple[int, float] | None = None,
    dba: tuple[int, float] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    cache_root: str | Path | None = None,
    progress: bool = True,
    print_fn=print,
    rerank: SuperGlobalRerank | None = None,
) -> dict[str, Any]:
    """Evaluate local features + an aggregator (ASMK, VLAD, Token) the way :func:`run_benchmark` evaluates
    a global model: the same datasets, query crops, metrics, printed lines and report.

    Descriptor sets are cached per dataset, local model and extraction settings, so trying another
    aggregator re-uses them. QE/DBA and ``rerank`` need global vectors (VLAD, Token), not ASMK.
    """
    from tokenret.extraction.local_sets import LocalExtractionConfig, extract_local_sets

    config = config or LocalExtractionConfig()
    if not aggregator.global_vectors and (qe or dba or rerank):
        raise ValueError(
            f"--qe/--dba/--rerank need global vectors; the {aggregator.name} aggregator ranks by its kernel"
        )
    if rerank is not None and (qe or dba):
        raise ValueError(RERANK_WITH_QE_DBA)
    cache_root = Path(cache_root) if cache_root else tokenret_home() / "descriptors"
    model_fp = model_fingerprint(local_model)
    settings = hashlib.sha256(
        json.dumps(config.fingerprint(local_model), sort_keys=True).encode()
    ).hexdigest()
    cache = cache_root / "local" / f"{model_fp[:16]}-{settings[:12]}"

    def sets_of(paths, boxes, what: str, label: str):
        return extract_local_sets(
            local_model, paths, boxes, config, cache / what, progress=progress, desc=label
        ).store

    distractors = None
    if r1m_root is not None:
        distractors = sets_of(R1MDistractors.from_root(r1m_root).image_paths(), None, "revisitop1m", "R1M")
    report = _new_report(local_model, model_fp, config.fingerprint(local_model), qe, dba, distractors, rerank)
    for name in datasets:
        ds = RevisitedDataset.from_root(data_root, name)
        ds.check_images()
        db_store = sets_of(
            [ds.image_path(i) for i in range(len(ds.imlist))], None, f"{name}/db", f"{name} database"
        )
        q_store = sets_of(
            [ds.query_path(i) for i in range(len(ds.qimlist))],
            [ds.query_box(i) for i in range(len(ds.qimlist))],
            f"{name}/queries",
            f"{name} queries",
        )
        db_sets = [db_store.get(i) for i in range(len(db_store))]
        if distractors is not None:
            db_sets += [distractors.get(i) for i in range(len(distractors))]
        q_sets = [q_store.get(i) for i in range(len(q_store))]
        aggregator.prepare(db_sets)
        if aggregator.global_vectors:
            results, top = evaluate_descriptors(
                aggregator.encode(db_sets),
                aggregator.encode(q_sets),
                ds.gnd,
                ks,
                qe=qe,
                dba=dba,
                rerank=rerank,
            )
        else:
            results, top = evaluate_scores(aggregator.scores(db_sets, q_sets), ds.gnd, ks)
        _report_dataset(report, name, ds, distractors is not None, results, top, print_fn)
    report["aggregator"] = aggregator.settings()
    return report
