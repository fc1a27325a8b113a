"""Reading, checking, saving and downloading model weights.

Files are always read with ``torch.load(..., weights_only=True)``: a file whose pickle would build
arbitrary objects (and so could run code) is refused. Released files may be plain state dicts or
nested under 'state_dict' / 'model' / 'model_state' (pycls), with 'module.' prefixes from DDP; margin-head
weights (``classifier*``) are ignored. CVNet's files hold its whole re-ranking model: the global network
is taken from under ``encoder_q.`` and the rest (the correlation-verification branch) is left out and
listed in ``LoadedCheckpoint.dropped``.
"""

from __future__ import annotations

import hashlib
import html.parser
import logging
import os
import pickle
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Format tag of checkpoints tokenret writes.
TOKENRET_FORMAT = "tokenret-checkpoint-v1"
#: Key prefixes of training-only heads, never needed for descriptors.
IGNORED_PREFIXES = ("classifier",)
#: Wrapper prefixes stripped from keys (DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Where CVNet's files keep the global network inside the re-ranking model's state dict.
CVNET_GLOBAL_PREFIX = "encoder_q."
#: Keys under which released files nest their state dict.
NESTING_KEYS = ("state_dict", "model", "model_state", "net")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used, with the reason and what to do."""


class WeightsUnavailableError(RuntimeError):
    """Released weights could not be downloaded (offline, moved, quota): says where to put them by hand."""


@dataclass
class LoadedCheckpoint:
    """A file's model weights. ``dropped``: keys of the file that belong to no global network (CVNet's
    re-ranking branch); ``layout``: how the weights were found."""

    state_dict: dict[str, torch.Tensor]
    source: str
    model_name: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    layout: str = "state dict (release format)"


def tokenret_home() -> Path:
    """Cache root: $TOKENRET_HOME, else ~/.cache/tokenret."""
    return Path(os.environ.get("TOKENRET_HOME") or Path.home() / ".cache" / "tokenret")


def describe_source(checkpoint: Any) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, Path)) else "<state dict>"


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path} (check the path, or use pretrained=True to download)"
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        head = f.read(16)
    # torch.save writes a zip archive; very old files are a bare pickle (first opcode PROTO, 0x80).
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        kind = _sniff(head)
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint ({kind}). Is it truncated (an interrupted download) or a web "
            "page saved under a .pth name? Download the file again."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load. The file holds Python objects beyond tensors and plain containers, "
            "so unpickling it could run code; tokenret only reads weights (torch.load weights_only=True). "
            "If you trust the file, re-save just its state dict (torch.save(obj['state_dict'], ...), or "
            "obj['model_state'] for pycls/CVNet files). "
            f"Detail: {e}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.load failed: {type(e).__name__}: {e}). "
            "Is it truncated (an interrupted download) or a web page saved under a .pth name?"
        ) from None


def _sniff(head: bytes) -> str:
    if not head:
        return "the file is empty"
    for magic, kind in (
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x89PNG", "a PNG image"),
        (b"<", "HTML/XML text"),
    ):
        if head.lstrip().startswith(magic):
            return f"it looks like {kind}"
    return f"it starts with bytes {head[:8]!r}"


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def read_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> LoadedCheckpoint:
    """Read a checkpoint file (or take a loaded dict) and return its model state dict and metadata."""
    source = describe_source(checkpoint)
    obj = _torch_load(Path(checkpoint)) if isinstance(checkpoint, (str, Path)) else checkpoint
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a dict of weights")
    meta: dict[str, Any] = {}
    if obj.get("format") == TOKENRET_FORMAT:
        meta = {"model_name": obj.get("model_name"), "model_kwargs": dict(obj.get("model_kwargs") or {})}
        meta["extra"] = {
            k: v for k, v in obj.items() if k not in ("model", "format", "model_name", "model_kwargs")
        }
        meta["layout"] = "tokenret checkpoint"
        obj = obj.get("model")
    else:
        for _ in range(3):  # released files: plain, or nested under 'state_dict' / 'model' / 'model_state'
            if _is_tensor_dict(obj):
                break
            inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not _is_tensor_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            f"{source}: no model weights found (expected a dict of tensors, possibly under "
            f"{', '.join(repr(k) for k in NESTING_KEYS)}; top-level keys: {keys})"
        )
    state = _strip_prefixes(obj)
    if not meta and any(k.startswith(CVNET_GLOBAL_PREFIX) for k in state):
        n = len(CVNET_GLOBAL_PREFIX)
        meta["dropped"] = [k for k in state if not k.startswith(CVNET_GLOBAL_PREFIX)]
        meta["layout"] = "CVNet release (global network under 'encoder_q.')"
        state = {k[n:]: v for k, v in state.items() if k.startswith(CVNET_GLOBAL_PREFIX)}
    return LoadedCheckpoint(state, source, **meta)


@dataclass
class KeyReport:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, expected, found
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyReport:
    """Compare a state dict with what ``model`` expects (works on meta-device models too)."""
    expected = model.state_dict()
    ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    present = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    # BatchNorm's num_batches_tracked does not affect outputs; tolerate files without it.
    missing = [k for k in expected if k not in present and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in present if k not in expected]
    mismatched = [
        (k, tuple(expected[k].shape), tuple(v.shape))
        for k, v in present.items()
        if k in expected and tuple(expected[k].shape) != tuple(v.shape)
    ]
    return KeyReport(missing, unexpected, mismatched, ignored)


def _listing(items: list, limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def format_report(report: KeyReport) -> str:
    parts = []
    if report.missing:
        parts.append(f"missing keys: {_listing(report.missing)}")
    if report.unexpected:
        parts.append(f"unexpected keys: {_listing(report.unexpected)}")
    if report.mismatched:
        parts.append(
            "wrong shapes: "
            + _listing([f"{k} expected {tuple(e)} found {tuple(f)}" for k, e, f in report.mismatched])
        )
    return "; ".join(parts)


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], name: str = "", source: str = ""
) -> KeyReport:
    """Load ``state`` into ``model``, refusing any missing, unexpected or mis-shaped key."""
    report = compare_keys(model, state)
    if not report.ok:
        arch = f"{name} ({type(model).__name__}, {getattr(model, 'model_kwargs', {})})"
        raise CheckpointError(
            f"{source or 'checkpoint'} does not fit {arch}: {format_report(report)}. "
            "Run `tokenret info FILE` to see which model the file matches."
        )
    usable = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    model.load_state_dict(usable, strict=False)
    return report


def save_checkpoint(model: nn.Module, path: str | Path, **extra: Any) -> Path:
    """Save a model so that ``create_model(model.model_name, checkpoint=path)`` rebuilds it.

    Written to a temporary file and renamed, so an interruption never leaves a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": TOKENRET_FORMAT,
        "model_name": getattr(model, "model_name", None),
        "model_kwargs": dict(getattr(model, "model_kwargs", {})),
        "model": model.state_dict(),
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- downloads


class _FormParser(html.parser.HTMLParser):
    """Collects the action and hidden inputs of the download form of Google Drive's 'large file' page."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.inputs: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form" and self.action is None:
            self.action = a.get("action")
        elif tag == "input" and a.get("name") and a.get("type", "hidden") == "hidden":
            self.inputs[a["name"]] = a.get("value") or ""


def _confirm_url(page: str, url: str) -> str | None:
    """The real download link behind a Google Drive confirmation page, if the page has one."""
    parser = _FormParser()
    parser.feed(page)
    if parser.action and parser.inputs:
        action = urllib.parse.urljoin(url, parser.action)
        return action + ("&" if "?" in action else "?") + urllib.parse.urlencode(parser.inputs)
    for token in page.split("confirm=")[1:]:
        value = token.split("&")[0].split('"')[0]
        if value:
            return url + ("&" if "?" in url else "?") + "confirm=" + urllib.parse.quote(value)
    return None


def download_file(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
) -> Path:
    """Download ``url`` to ``dest`` (through ``dest.part``, renamed when complete and verified).

    Follows Google Drive's confirmation page for large files. Raises WeightsUnavailableError, naming the URL
    and where to put the file by hand, when the network cannot be reached or the server answers with an
    error or a web page instead of the file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    by_hand = f"Download it by hand from {url} and save it as {dest}"
    current = url
    try:
        for _ in range(3):
            req = urllib.request.Request(current, headers={"User-Agent": "tokenret"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                ctype = resp.headers.get("Content-Type", "")
                if ctype.startswith("text/html"):
                    page = resp.read(1 << 20).decode("utf-8", "replace")
                    nxt = _confirm_url(page, current)
                    if nxt is None or nxt == current:
                        raise WeightsUnavailableError(
                            f"{url} answered with a web page instead of the file "
                            "(Drive quota or a moved file?). " + by_hand
                        )
                    current = nxt
                    continue
                total = int(resp.headers.get("Content-Length") or 0) or None
                with (
                    open(part, "wb") as f,
                    tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
                ):
                    while block := resp.read(1 << 20):
                        f.write(block)
                        bar.update(len(block))
                break
        else:
            raise WeightsUnavailableError(f"{url}: too many confirmation pages. " + by_hand)
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise WeightsUnavailableError(f"could not download {url} ({reason}). {by_hand}") from None
    digest = sha256sum(part)
    if (sha256 and digest != sha256) or (sha256_prefix and not digest.startswith(sha256_prefix)):
        part.unlink(missing_ok=True)
        raise WeightsUnavailableError(
            f"{url}: downloaded file has sha256 {digest}, expected {sha256 or sha256_prefix + '...'}; "
            "the file was deleted. Try again, or " + by_hand[0].lower() + by_hand[1:]
        )
    os.replace(part, dest)
    return dest


def fetch_release_weights(cfg: Any, progress: bool = True) -> Path:
    """Path of a registry model's released weights in the cache, downloading them the first time.

    The sha256 of the first download is recorded beside the file (``.sha256``) and checked on later uses,
    so a file that changed or was damaged in the cache is detected.
    """
    w = cfg.weights
    if w is None:
        raise ValueError(f"model {cfg.name!r} has no released weights")
    dest = tokenret_home() / "checkpoints" / w.filename
    record = dest.with_name(dest.name + ".sha256")
    if not dest.exists() and not w.url:
        manual = getattr(w, "manual", "") or f"Get {w.filename} from the release"
        raise WeightsUnavailableError(
            f"{cfg.name}: the released weights cannot be downloaded automatically. "
            f"{manual}, and save it as {dest} "
            f"(or pass it as checkpoint= / --checkpoint FILE)"
        )
    if not dest.exists():
        log.info("downloading %s weights from %s to %s", cfg.name, w.url, dest)
        download_file(w.url, dest, sha256=w.sha256, progress=progress)
        _check_is_checkpoint(dest)
        record.write_text(sha256sum(dest) + "\n")
    else:
        expected = w.sha256 or (record.read_text().strip() if record.exists() else None)
        if expected and sha256sum(dest) != expected:
            raise CheckpointError(
                f"{dest}: sha256 differs from the one recorded when it was downloaded; "
                "delete it to download again"
            )
    return dest


def _check_is_checkpoint(path: Path) -> None:
    try:
        read_checkpoint(path)
    except CheckpointError as e:
        bad = path.with_name(path.name + ".bad")
        shutil.move(path, bad)
        raise CheckpointError(f"downloaded file is not usable (moved to {bad}): {e}") from None


def fetch_torchvision_weights(arch: str, weights_name: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """ImageNet weights of a torchvision ResNet via torchvision's weights API, cached in torch hub's dir."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(f"{_enum_name(arch)}.{weights_name}")
    except (KeyError, ValueError, AttributeError):
        raise ValueError(f"torchvision has no weights {weights_name!r} for {arch}") from None
    filename = os.path.basename(urllib.parse.urlparse(weights.url).path)
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not dest.exists():
        # torchvision names its files <arch>-<first sha256 hex digits>.pth
        prefix = filename.rsplit("-", 1)[-1].split(".")[0] if "-" in filename else None
        download_file(weights.url, dest, sha256_prefix=prefix, progress=progress)
    return torch.load(dest, map_location="cpu", weights_only=True)


def _enum_name(arch: str) -> str:
    return {
        "resnet18": "ResNet18_Weights",
        "resnet34": "ResNet34_Weights",
        "resnet50": "ResNet50_Weights",
        "resnet101": "ResNet101_Weights",
        "resnet152": "ResNet152_Weights",
    }[arch]
