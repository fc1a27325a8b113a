"""What the ``tokenret`` subcommands share: argument groups defined once, the objects built from them, and
the error handling that turns a user's mistake into one line and exit status 2.

Every command that extracts descriptors takes the same flags with the same defaults:

* :func:`add_model_arguments`: the global model (``--model``, ``--checkpoint``/``--pretrained``,
  ``--model-arg``).
* :func:`add_image_arguments`: how images are sized (``--max-size``, ``--scales``); left out, the model's
  own input convention decides (Token: 1024 px, 3 scales; SuperGlobal: the file's size, its 3 scales).
* :func:`add_network_arguments`: how the global network runs and its scales combine (``--amp``,
  ``--compile``, ``--scale-pool``).
* :func:`add_runtime_arguments`: how the work is run, never what it computes (``--batch-size``,
  ``--workers``, ``--streams``, ``--device``, ``--no-winograd``, ``--engine``: torch or onnxruntime, the
  same descriptors to the export's parity bound).
* :func:`add_extraction_arguments`: the last three together, for commands that choose their own settings.
* :func:`add_local_arguments` and :func:`add_aggregator_arguments`: local features (HOW, DELF) and how they
  become one vector per image.

The heavy libraries (torch, faiss, PIL) are imported inside the functions that build objects, so that
``tokenret --help`` stays quick.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import traceback
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "add_aggregator_arguments",
    "add_device_argument",
    "add_extraction_arguments",
    "add_image_arguments",
    "add_local_arguments",
    "add_max_size_argument",
    "add_model_arguments",
    "add_network_arguments",
    "add_runtime_arguments",
    "add_verbose_argument",
    "extraction_config_from_args",
    "local_config_from_args",
    "local_model_from_args",
    "max_size_from_args",
    "model_from_args",
    "model_name_from_args",
    "parse_key_values",
    "recorded_model",
    "run_parsed",
    "runtime_from_args",
    "set_interrupt_hint",
    "set_model_from_args",
    "user_errors",
]

DEFAULT_MODEL = "token_r101"

# tokenret.extraction.RELEASE_SCALES, written out for the help text: importing it would import torch
# (tests/test_cli_experience.py checks that the two agree).
HELP_SCALES = (1.0, 2**0.5, 2**-0.5)

log = logging.getLogger("tokenret")


def parse_key_values(items: list[str] | None) -> dict[str, object]:
    """['dim=64', 'backbone=resnet18'] -> {'dim': 64, 'backbone': 'resnet18'} (Python literals, else str)."""
    out: dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------ argument groups


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    """``-v/--verbose``: INFO logging instead of WARNING (read by :func:`run_parsed`)."""
    p.add_argument("-v", "--verbose", action="store_true", help="log more")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The global model: a registry name, its weights, architecture overrides."""
    p.add_argument(
        "--model",
        default=None,
        help="registry name (see `tokenret models`; default: the one a --checkpoint saved by tokenret "
        f"records, else {DEFAULT_MODEL})",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--checkpoint", help="weights file (released or saved by tokenret)")
    g.add_argument("--pretrained", action="store_true", help="download the released weights once")
    p.add_argument("--model-arg", nargs="*", metavar="KEY=VALUE", help="architecture overrides, e.g. dim=512")


def add_max_size_argument(
    p: argparse.ArgumentParser | argparse._ArgumentGroup, *, model_default: bool = False
) -> None:
    """``--max-size``: the longest image side after loading. With ``model_default`` it defaults to None,
    the model's own (:func:`max_size_from_args`); 0 keeps the file's size."""
    if model_default:
        p.add_argument(
            "--max-size",
            type=int,
            default=None,
            help="longest image side, never enlarged (default: the model's: 1024 for Token and the "
            "cirtorch baselines, the file's own size for SuperGlobal; 0: the file's own size)",
        )
    else:
        p.add_argument("--max-size", type=int, default=1024, help="longest image side (never enlarged)")


def max_size_from_args(value: int | None, model_default: int | None = 1024) -> int | None:
    """``--max-size`` as ``ExtractionConfig.max_size``: None (not given) -> ``model_default``; 0 -> None."""
    if value is None:
        return model_default
    if value < 0:
        raise ValueError(f"--max-size must be positive (0: the file's own size), got {value}")
    return None if value == 0 else value


def add_image_arguments(p: argparse.ArgumentParser) -> None:
    """How images are sized before the network sees them: ``--max-size`` and ``--scales``."""
    g = p.add_argument_group("images")
    add_max_size_argument(g, model_default=True)
    g.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=None,
        help=f"multi-scale factors (default: the model's, {', '.join(f'{s:.4g}' for s in HELP_SCALES)} "
        "for Token; with --local the extractor's own pyramid)",
    )


def add_network_arguments(p: argparse.ArgumentParser) -> None:
    """How the global network runs: autocast and ``torch.compile``."""
    g = p.add_argument_group("global network")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast (fp16: GPU only)")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the trunk, weights frozen (a one-off compilation, then faster on CPU; needs g++; "
        "see bench/README.md)",
    )
    g.add_argument(
        "--scale-pool",
        default="model",
        metavar="POOL",
        help="how the scales' descriptors combine: mean, gem, gem:P, sgem (SuperGlobal's sGeM: L2, then "
        "element-wise max), sgem:P (its power form, e.g. sgem:10); default: the model's own (mean for "
        "Token, gem for cirtorch GeM networks, sgem for SuperGlobal)",
    )


def add_device_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``: where the networks run."""
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: $TOKENRET_DEVICE, else cuda if available)",
    )


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """How extraction is run, never what it computes: batching, decoding processes, CPU streams, device."""
    g = p.add_argument_group("run-time (the same descriptors to float rounding)")
    g.add_argument(
        "--batch-size", type=int, default=8, help="global descriptors: images of equal size per forward pass"
    )
    g.add_argument("--workers", type=int, default=2, help="image decoding processes (0: in this process)")
    g.add_argument(
        "--streams",
        type=int,
        default=0,
        help="CPU: batches run at once, sharing torch's threads (default 0: 2 with 2+ threads; 1: off)",
    )
    add_device_argument(g)
    g.add_argument(
        "--no-winograd",
        dest="winograd",
        action="store_false",
        help="CPU, global descriptors: keep oneDNN's direct 3x3 convolutions instead of NNPACK's fast ones "
        "(which differ by float32 rounding, relative ~1e-5 on the trunk's features)",
    )
    g.add_argument(
        "--engine",
        choices=["torch", "onnxruntime"],
        default=None,
        help="what runs the global network: torch (default), or onnxruntime (the model exported to ONNX "
        "once into $TOKENRET_HOME/onnx; needs pip install 'tokenret[onnx]'; descriptors within 1e-4 of "
        "torch's, cached apart; an index keeps the engine it was made with)",
    )


def add_extraction_arguments(p: argparse.ArgumentParser) -> None:
    """Everything that says how descriptors are extracted: images, global network and run-time groups."""
    add_image_arguments(p)
    add_network_arguments(p)
    add_runtime_arguments(p)


def add_local_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    """A local-feature extractor (HOW, DELF), its weights, and how its sets are kept."""
    g = p.add_argument_group("local features (HOW, DELF)")
    g.add_argument(
        "--local",
        required=required,
        metavar="NAME",
        help="local-feature extractor: how_r18, how_r50, how_r101, delf_r50",
    )
    w = g.add_mutually_exclusive_group()
    w.add_argument("--local-checkpoint", help="its weights (HOW's .pth formats, or a tokenret file)")
    w.add_argument("--local-pretrained", action="store_true", help="download its released weights once")
    g.add_argument("--topk", type=int, default=None, help="features kept per image (default: the model's)")
    g.add_argument(
        "--sets-dtype",
        choices=["float16", "float32"],
        default="float16",
        help="cached sets' precision (float32: published ASMK numbers to the last decimal, twice the space)",
    )
    g.add_argument(
        "--exact-trunk",
        action="store_true",
        help="CPU: run the extractor's trunk as is, not as a folded/fused copy (slower; the copy's features "
        "agree to float rounding; implied by --sets-dtype float32)",
    )


def add_aggregator_arguments(p: argparse.ArgumentParser, *, asmk: bool) -> None:
    """How local features become a score: ``token`` and ``vlad`` (one vector per image), and with ``asmk``
    ASMK's own inverted file (only ``evaluate`` keeps one)."""
    g = p.add_argument_group("aggregating local features (with --local)")
    names = ["asmk", "vlad", "token"] if asmk else ["token", "vlad"]
    g.add_argument(
        "--aggregator",
        choices=names,
        help=("asmk: ASMK* as HOW; vlad; " if asmk else "vlad; ")
        + "token: a token_set_* model (--model/--checkpoint)",
    )
    g.add_argument(
        "--codebook", help=f"visual words for {'asmk/vlad' if asmk else 'vlad'} (`tokenret codebook`)"
    )
    g.add_argument("--vlad-power", type=float, default=None, help="VLAD signed power normalisation")
    if asmk:
        g.add_argument(
            "--codebook-size", type=int, help="learn a codebook of K words from the database instead"
        )
        g.add_argument("--no-binary", action="store_true", help="ASMK with float residuals instead of ASMK*")
        g.add_argument("--alpha", type=float, default=3.0, help="ASMK selectivity exponent")
        g.add_argument("--tau", type=float, default=0.0, help="ASMK similarity threshold")
        g.add_argument(
            "--query-assignment", type=int, default=5, help="ASMK visual words per query descriptor"
        )


# ------------------------------------------------------------------------------- objects built from them


def recorded_model(checkpoint: str | None) -> str | None:
    """The model name a weights file saved by tokenret records (None for other files, or none given).

    The file is memory-mapped, not read: its tensors are read once, when the model is built.
    """
    if not checkpoint:
        return None
    import torch

    from tokenret.models.checkpoints import TOKENRET_FORMAT

    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a readable file: building the model reports why, with advice
        return None
    if (
        isinstance(obj, dict)
        and obj.get("format") == TOKENRET_FORMAT
        and isinstance(obj.get("model_name"), str)
    ):
        return obj["model_name"]
    return None


def model_name_from_args(args: argparse.Namespace) -> str:
    """``--model``; left out, the name a ``--checkpoint`` saved by tokenret records, else the default."""
    return getattr(args, "model", None) or recorded_model(getattr(args, "checkpoint", None)) or DEFAULT_MODEL


def model_from_args(args: argparse.Namespace) -> Any:
    """The global model of :func:`add_model_arguments` (a warning when it has random weights)."""
    from tokenret.models.registry import create_model

    name = model_name_from_args(args)
    recorded = recorded_model(args.checkpoint)
    if recorded and recorded != name:
        raise ValueError(
            f"--model {name}: {args.checkpoint} was saved by tokenret for {recorded}; leave out --model "
            f"(the file names its model) or give --model {recorded}"
        )
    if not args.checkpoint and not args.pretrained:
        log.warning("no --checkpoint or --pretrained: %s has random weights, results are meaningless", name)
    return create_model(
        name, checkpoint=args.checkpoint, pretrained=args.pretrained, **parse_key_values(args.model_arg)
    )


def extraction_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`tokenret.extraction.ExtractionConfig` of :func:`add_extraction_arguments`; what is not
    given comes from the input convention of the ``--model`` registry entry."""
    from tokenret.extraction import ExtractionConfig
    from tokenret.models.registry import get_model_config

    convention = get_model_config(model_name_from_args(args)).input_convention
    return ExtractionConfig(
        max_size=max_size_from_args(args.max_size, convention.max_size),
        scales=tuple(args.scales) if args.scales else convention.scales,
        scale_pool=getattr(args, "scale_pool", "model"),
        batch_size=args.batch_size,
        num_workers=args.workers,
        amp=args.amp,
        device=args.device,
        compile=args.compile,
        streams=args.streams,
        winograd=args.winograd,
        engine=getattr(args, "engine", None) or "torch",
    )


def runtime_from_args(args: argparse.Namespace) -> dict[str, object]:
    """The run-time settings of :func:`add_runtime_arguments`, as keyword arguments of the folder index
    (whose stored settings fix everything else)."""
    return {
        "batch_size": args.batch_size,
        "num_workers": args.workers,
        "device": args.device,
        "streams": args.streams,
        "winograd": args.winograd,
        "engine": getattr(args, "engine", None),  # None: the index's own
    }


def local_model_from_args(args: argparse.Namespace) -> Any:
    """The local-feature extractor of :func:`add_local_arguments` (a warning when it has random weights)."""
    from tokenret.models.local import create_local_model

    if not args.local_checkpoint and not args.local_pretrained:
        log.warning(
            "no --local-checkpoint or --local-pretrained: %s has random weights, results are meaningless",
            args.local,
        )
    return create_local_model(args.local, args.local_checkpoint, pretrained=args.local_pretrained)


def local_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`tokenret.extraction.LocalExtractionConfig` of the image, run-time and local groups."""
    from tokenret.extraction import LocalExtractionConfig

    return LocalExtractionConfig(
        max_size=max_size_from_args(args.max_size),
        scales=tuple(args.scales) if args.scales else None,
        topk=args.topk,
        num_workers=args.workers,
        device=args.device,
        streams=args.streams,
        dtype=args.sets_dtype,
        fast_trunk=False if args.exact_trunk else None,
    )


def set_model_from_args(args: argparse.Namespace) -> Any:
    """The Token set model for --aggregator token: --model/--checkpoint, by default token_set_<--local>."""
    if not args.model and not recorded_model(args.checkpoint):  # the default global model makes no sense here
        args.model = f"token_set_{args.local}"
    return model_from_args(args)


# -------------------------------------------------------------------------------------------- running


# The errors a user can act on: printed as one line, exit status 2 (anything else is a bug: a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    KeyError,
    ValueError,
    ImportError,  # an optional dependency (faiss-cpu, qdrant-client): the message names the install
    ConnectionError,  # a search server (Qdrant) that cannot be reached
)

# tokenret's own errors a user can act on, by module: looked up only once their module has been imported
# (none can come from a module never imported, and importing them to name them would import torch).
TOKENRET_USER_ERRORS: dict[str, tuple[str, ...]] = {
    "tokenret.models.checkpoints": ("CheckpointError", "WeightsUnavailableError"),
    "tokenret.extraction.image_list": ("ExtractionError",),
    "tokenret.data.images": ("ImageLoadError",),
    "tokenret.collection": ("IndexDamagedError", "IndexLockedError", "IndexMismatchError"),
    "tokenret.export.onnx": ("ExportError",),
}

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it) and after a closed stdout (128 + SIGPIPE).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes printed as one line with exit status 2 (of the modules imported so far)."""
    found = list(USER_ERRORS)
    for module_name, names in TOKENRET_USER_ERRORS.items():
        module = sys.modules.get(module_name)
        if module is not None:
            found.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(found)


def set_interrupt_hint(args: argparse.Namespace, hint: str) -> None:
    """What :func:`run_parsed` prints after Ctrl-C, e.g. how to resume (a command sets it once it knows)."""
    args.interrupt_hint = hint


def run_parsed(args: argparse.Namespace) -> int:
    """Set up logging from ``--verbose``, run the subcommand's ``func``, report user errors on stderr.

    A user error is one line on stderr (with ``-v``, its traceback first); Ctrl-C stops with the command's
    resume hint (:func:`set_interrupt_hint`); a closed stdout (``tokenret duplicates IDX | head``) ends
    quietly.

    Returns:
        The subcommand's exit status; 2 after a user error, 130 after Ctrl-C, 141 after a closed stdout.
    """
    verbose = getattr(args, "verbose", False)
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    try:
        status = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return status
    except KeyboardInterrupt:
        if verbose:
            traceback.print_exc()
        hint = getattr(args, "interrupt_hint", None)
        print(f"\ntokenret: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if not isinstance(e, user_errors()):
            raise
        if verbose:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        if isinstance(e, OSError) and e.filename is not None and not isinstance(e, ConnectionError):
            msg = f"{e.strerror or e}: {e.filename}"
        print(f"tokenret: error: {one_line(str(msg))}", file=sys.stderr)
        return 2


def one_line(text: str) -> str:
    """``text`` on one line (a multi-line message's lines joined with '; ')."""
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no closed pipe to complain of."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor (a captured stdout): nothing will be flushed to a pipe
        pass
