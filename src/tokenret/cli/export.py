"""``tokenret export``: a global model's single-scale descriptor network as an ONNX file."""

from __future__ import annotations

import argparse
from typing import Any

from tokenret.cli.common import parse_key_values

__all__ = ["add_parser"]

# tokenret.export.DEFAULT_OPSET, written out: importing it would import torch (tests/test_export.py
# checks that the two agree).
HELP_OPSET = 17


def add_parser(subparsers: Any) -> None:
    """Register ``export``."""
    p = subparsers.add_parser(
        "export",
        help="write a global model's descriptor network as ONNX (for onnxruntime, C++, mobile, browsers)",
        description="Write the single-scale descriptor network of a registry model as an ONNX file: input "
        "images (batch, 3, height, width) already sized and normalised in the model's convention, output "
        "L2-normalised descriptors ('descriptors') and the same before normalisation ('features'), dynamic "
        "batch, height and width. The input convention and the extraction settings the model is evaluated "
        "with go into the file's metadata (see `tokenret info FILE.onnx`). Needs "
        "pip install 'tokenret[onnx]'.",
    )
    p.add_argument("model", help="registry name (see `tokenret models`), e.g. token_r101")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="weights file (released or saved by tokenret)")
    g.add_argument("--pretrained", action="store_true", help="download the released weights once")
    p.add_argument("--model-arg", nargs="*", metavar="KEY=VALUE", help="architecture overrides, e.g. dim=512")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=HELP_OPSET, help=f"ONNX opset (default {HELP_OPSET})")
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip running the file with onnxruntime at two other sizes against PyTorch",
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from tokenret.cli.common import log
    from tokenret.export import export_onnx, format_onnx_metadata, require_onnxruntime
    from tokenret.models.checkpoints import sha256sum
    from tokenret.models.registry import create_model

    require_onnxruntime("onnx")  # before the weights are read
    if not args.checkpoint and not args.pretrained:
        log.warning("no --checkpoint or --pretrained: %s has random weights", args.model)
    model = create_model(
        args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, **parse_key_values(args.model_arg)
    )
    extra: dict[str, Any] = {}
    if args.checkpoint:
        extra = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": sha256sum(args.checkpoint)}
    elif args.pretrained:
        extra = {"checkpoint": "released weights (--pretrained)"}
    meta = export_onnx(model, args.out, opset=args.opset, check=args.check, metadata=extra)
    print(format_onnx_metadata(args.out, meta))
    print(f">> wrote {args.out}")
    return 0
