"""Local features: ``tokenret extract-local`` (descriptor sets of a folder or a training set),
``tokenret delf-pca`` (DELF's descriptor PCA) and ``tokenret codebook`` (visual words for ASMK / VLAD)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tokenret.cli.common import (
    add_image_arguments,
    add_local_arguments,
    add_max_size_argument,
    add_runtime_arguments,
    local_config_from_args,
    local_model_from_args,
    set_interrupt_hint,
)

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    """Register ``extract-local``, ``delf-pca`` and ``codebook``."""
    p = subparsers.add_parser(
        "extract-local",
        help="local descriptor sets of a training set or a folder (for `tokenret train` and `codebook`)",
    )
    add_local_arguments(p, required=True)
    p.add_argument("--images", help="a folder of images (no labels), searched recursively")
    p.add_argument("--data-format", choices=["gldv2", "folders", "csv"], help="a labelled training set")
    p.add_argument("--data-root", help="its folder (gldv2: the GLDv2 root; folders: one folder per class)")
    p.add_argument("--csv", help="for --data-format csv: rows of path,label")
    p.add_argument("--gldv2-list", default="train_clean.csv", help="for gldv2: the list file")
    p.add_argument("--out", required=True, help="output folder: descriptors/, labels.txt, images.txt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_image_arguments(p)
    add_runtime_arguments(p)
    p.set_defaults(func=_cmd_extract_local)

    p = subparsers.add_parser(
        "delf-pca", help="learn DELF's descriptor PCA (e.g. 128-d) and save it with the weights"
    )
    p.add_argument("--checkpoint", help="DELF weights (e.g. trained with configs/delf_r50_gldv2.yaml)")
    p.add_argument("--images", required=True, help="a folder of training images (not the test set)")
    p.add_argument("--dim", type=int, default=128, help="output dimension (released DELF models: 40 or 128)")
    p.add_argument("--max-images", type=int, default=5000)
    add_max_size_argument(p)
    p.add_argument("--score-threshold", type=float, default=None, help="override the attention threshold")
    p.add_argument("--out", required=True, help="the DELF file with its PCA (--local-checkpoint of delf_r50)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_delf_pca)

    p = subparsers.add_parser(
        "codebook", help="learn visual words (k-means) for ASMK / VLAD from extracted sets"
    )
    p.add_argument("sets", help="a folder written by `tokenret extract-local`")
    p.add_argument("--size", type=int, default=65536, help="number of words (HOW/ASMK: 65536)")
    p.add_argument(
        "--max-descriptors", type=int, default=None, help="sample at most this many (default 256/word)"
    )
    p.add_argument("--seed", type=int, default=1234, help="sampling and k-means seed (faiss's, as ASMK)")
    p.add_argument("--out", required=True, help="codebook file (.npy)")
    p.set_defaults(func=_cmd_codebook)


def _cmd_extract_local(args: argparse.Namespace) -> int:
    from tokenret.data.files import find_images
    from tokenret.data.folders import read_class_folders, read_csv_labels
    from tokenret.data.gldv2 import read_gldv2
    from tokenret.extraction import extract_local_sets

    if bool(args.images) == bool(args.data_format):
        raise ValueError("give either --images FOLDER or --data-format FORMAT --data-root ROOT")
    if args.images:
        paths = [str(p) for p in find_images(args.images)]
        labels, ids = None, paths
    else:
        if args.data_format == "gldv2":
            images = read_gldv2(args.data_root, args.gldv2_list)
        elif args.data_format == "folders":
            images = read_class_folders(args.data_root)
        else:
            if not args.csv:
                raise ValueError("--data-format csv needs --csv FILE")
            images = read_csv_labels(args.csv, args.data_root)
        paths, ids = images.paths, images.ids
        labels = [images.class_names[c] for c in images.labels]
    if not paths:
        raise FileNotFoundError(f"no images found in {args.images or args.data_root}")
    out = Path(args.out)
    model = local_model_from_args(args)
    set_interrupt_hint(
        args, f"the sets finished so far are kept in {out / 'shards'}: run the same command again to go on"
    )
    result = extract_local_sets(
        model,
        paths,
        None,
        local_config_from_args(args),
        out / "shards",
        on_error="record",
        progress=not args.quiet,
        desc=args.local,
    )
    result.store.save(out / "descriptors")
    (out / "images.txt").write_text("".join(f"{i}\n" for i in ids))
    if labels is not None:
        (out / "labels.txt").write_text("".join(f"{c}\n" for c in labels))
    (out / "failures.json").write_text(json.dumps({paths[i]: r for i, (_, r) in result.failures.items()}))
    print(
        f">> {len(paths) - len(result.failures)} images, {result.store.num_descriptors} descriptors "
        f"({model.output_dim}-d) written to {out / 'descriptors'}"
    )
    if result.failures:
        print(
            f">> {len(result.failures)} unreadable image(s) kept as empty sets: see {out / 'failures.json'}"
        )
    return 0


def _cmd_delf_pca(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tokenret.data.files import find_images
    from tokenret.data.images import ImageLoadError, load_image, to_tensor
    from tokenret.extraction import normalisation
    from tokenret.models.delf import create_delf, learn_pca, save_delf

    model = create_delf("delf_r50", args.checkpoint)
    if args.score_threshold is not None:
        model.runtime["score_threshold"] = args.score_threshold
    paths = find_images(args.images)[: args.max_images]
    if not paths:
        raise FileNotFoundError(f"no images found in {args.images}")
    mean, std = normalisation(model)
    failures: list[str] = []

    def images():
        for p in tqdm(paths, desc="DELF PCA", unit="img", disable=args.quiet):
            try:
                yield to_tensor(load_image(p, args.max_size), mean, std)
            except ImageLoadError as e:
                failures.append(f"{p}: {e}")

    n = learn_pca(model, images(), args.dim)
    path = save_delf(model, args.out)
    for f in failures:
        print(f">> unreadable, left out: {f}")
    used = len(paths) - len(failures)
    print(f">> {args.dim}-d PCA learned from {n} descriptors of {used} images; saved {path}")
    return 0


def _cmd_codebook(args: argparse.Namespace) -> int:
    import numpy as np

    from tokenret.aggregate.aggregators import CODEBOOK_SAMPLES_PER_WORD
    from tokenret.aggregate.codebook import Codebook
    from tokenret.data.local_store import LocalDescriptorStore

    root = Path(args.sets)
    store = LocalDescriptorStore.load(root / "descriptors" if (root / "descriptors").is_dir() else root)
    candidates = (root / "shards" / "manifest.json", root / "manifest.json", root.parent / "manifest.json")
    manifest = next((m for m in candidates if m.is_file()), None)
    scales = json.loads(manifest.read_text()).get("extraction", {}).get("scales") if manifest else None
    if scales is not None and scales != [1.0]:
        logging.getLogger("tokenret").warning(
            "these sets were extracted at scales %s: HOW learns its codebook from single-scale sets "
            "(extract-local --scales 1), so published ASMK numbers need those",
            scales,
        )
    rng = np.random.default_rng(args.seed)
    wanted = args.max_descriptors or CODEBOOK_SAMPLES_PER_WORD * args.size
    n = store.num_descriptors
    rows = np.sort(rng.choice(n, size=wanted, replace=False)) if n > wanted else np.arange(n)
    x = np.asarray(store.descriptor_rows(rows), np.float32)
    codebook = Codebook.train(x, args.size, seed=args.seed)
    path = codebook.save(args.out)
    print(f">> {args.size} visual words from {len(x)} of {n} descriptors written to {path}")
    return 0
