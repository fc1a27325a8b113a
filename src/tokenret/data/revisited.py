"""Revisited Oxford and Paris (roxford5k, rparis6k) and the R1M distractors (revisitop1m).

Layout (revisitop / cirtorch convention)::

    <root>/roxford5k/gnd_roxford5k.pkl      <root>/roxford5k/jpg/<imname>.jpg
    <root>/rparis6k/gnd_rparis6k.pkl        <root>/rparis6k/jpg/<imname>.jpg
    <root>/revisitop1m/revisitop1m.txt      <root>/revisitop1m/jpg/<line of the txt>

Ground-truth pickles are read with a restricted unpickler that builds only plain containers, numbers and
strings, so a tampered file cannot run code. Query images are not part of the database.

Example:
    >>> ds = RevisitedDataset.from_root("data/datasets", "roxford5k")  # doctest: +SKIP
    >>> len(ds.imlist), len(ds.qimlist), ds.query_box(0)  # doctest: +SKIP
    (4993, 70, (136.5, 34.1, 648.5, 955.7))
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATASET_NAMES",
    "GroundTruthError",
    "R1MDistractors",
    "RevisitedDataset",
    "load_ground_truth_pickle",
]

#: Dataset names accepted by :meth:`RevisitedDataset.from_root`.
DATASET_NAMES = ("roxford5k", "rparis6k")

_GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
_IMAGE_ARCHIVES = {
    "roxford5k": "http://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz",
    "rparis6k": "http://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz and paris_2.tgz",
}
_R1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"

#: The only globals a ground-truth pickle may reference (plain containers; the real files need none).
#: Protocols 0-2 name the module ``__builtin__`` (Python 2 spelling).
_ALLOWED_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("set", "frozenset")
)


class GroundTruthError(ValueError):
    """A ground-truth file that cannot be read or does not have the revisitop layout."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every class or function except set/frozenset."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise GroundTruthError(
            f"{self._source}: refused to load {module}.{name}. Ground-truth pickles hold only lists, dicts, "
            "numbers and strings; a file that asks for other objects could run code. Re-download it "
            f"(e.g. {_GND_URL.format(name='<dataset>')})."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise GroundTruthError(f"{self._source}: refused persistent id {pid!r} in a ground-truth pickle")


def load_ground_truth_pickle(path: str | Path) -> Any:
    """Load a pickle that may contain only plain containers, numbers and strings.

    Raises:
        FileNotFoundError: the file does not exist.
        GroundTruthError: the file is not a pickle, is damaged, or references any class or function.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    try:
        with path.open("rb") as f:
            return _PlainDataUnpickler(f, path).load()
    except GroundTruthError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise GroundTruthError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_ground_truth(data: Any, source: Path) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Check the revisitop layout; return (imlist, qimlist, gnd)."""
    if not isinstance(data, Mapping):
        raise GroundTruthError(
            f"{source}: expected a dict with imlist, qimlist, gnd; got {type(data).__name__}"
        )
    missing = [key for key in ("imlist", "qimlist", "gnd") if key not in data]
    if missing:
        raise GroundTruthError(f"{source}: missing keys {missing} (expected revisitop imlist, qimlist, gnd)")
    imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
    for key, names in (("imlist", imlist), ("qimlist", qimlist)):
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise GroundTruthError(f"{source}: {key} must be a list of image names")
    if not isinstance(gnd, (list, tuple)) or len(gnd) != len(qimlist):
        raise GroundTruthError(f"{source}: gnd must be a list with one entry per query ({len(qimlist)})")
    n = len(imlist)
    for q, g in enumerate(gnd):
        if not isinstance(g, Mapping):
            raise GroundTruthError(f"{source}: gnd[{q}] is {type(g).__name__}, expected a dict")
        for key in ("easy", "hard", "junk"):
            idx = g.get(key)
            if not isinstance(idx, (list, tuple)) or not all(_is_int(i) and 0 <= i < n for i in idx):
                raise GroundTruthError(f"{source}: gnd[{q}]['{key}'] must be a list of indices in [0, {n})")
        bbx = g.get("bbx")
        if bbx is not None and (
            not isinstance(bbx, (list, tuple))
            or len(bbx) != 4
            or not all(isinstance(v, (int, float)) for v in bbx)
        ):
            raise GroundTruthError(f"{source}: gnd[{q}]['bbx'] must be [x1, y1, x2, y2]")
    return list(imlist), list(qimlist), [dict(g) for g in gnd]


@dataclass
class RevisitedDataset:
    """A revisitop-style benchmark: database and query image names, per-query ground truth, image folder.

    Attributes:
        name: dataset name (e.g. 'roxford5k').
        imlist: database image names without extension; ``gnd`` indices point into it.
        qimlist: query image names without extension (not part of the database).
        gnd: per query, a dict with ``easy``, ``hard``, ``junk`` (index lists) and ``bbx`` ([x1, y1, x2, y2]).
        images_dir: folder of ``<name>.jpg`` files for both database and query images.
        ext: image file extension.
    """

    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    images_dir: Path
    ext: str = ".jpg"

    @classmethod
    def from_root(cls, root: str | Path, name: str) -> RevisitedDataset:
        """Load ``<root>/<name>/gnd_<name>.pkl`` (or ``.json``); images are in ``<root>/<name>/jpg/``.

        roxford5k and rparis6k are the benchmarks; any other folder in the same layout works too (e.g. the
        mini-RPar ``rparis6k_subset`` with its ``gnd_rparis6k_subset.json``).
        """
        folder = Path(root) / name
        gnd_path = folder / f"gnd_{name}.pkl"
        json_path = folder / f"gnd_{name}.json"
        if not gnd_path.is_file() and json_path.is_file():
            return cls.from_json(json_path, folder / "jpg", name)
        if not gnd_path.is_file():
            if name in DATASET_NAMES:
                raise FileNotFoundError(
                    f"ground truth of {name} not found: {gnd_path}. Download {_GND_URL.format(name=name)} "
                    f"into {folder}/ (images go to {folder / 'jpg'}/, from {_IMAGE_ARCHIVES[name]})."
                )
            raise FileNotFoundError(
                f"dataset {name!r} not found: neither {gnd_path} nor {json_path} exists "
                f"(known benchmarks: {', '.join(DATASET_NAMES)})"
            )
        imlist, qimlist, gnd = _validate_ground_truth(load_ground_truth_pickle(gnd_path), gnd_path)
        return cls(name=name, imlist=imlist, qimlist=qimlist, gnd=gnd, images_dir=folder / "jpg")

    @classmethod
    def from_json(
        cls, path: str | Path, images_dir: str | Path | None = None, name: str | None = None
    ) -> RevisitedDataset:
        """Load ground truth from a JSON file with the pickle's layout (e.g. ``gnd_rparis6k_subset.json``).

        Args:
            path: the JSON file.
            images_dir: image folder; defaults to ``jpg/`` beside the file.
            name: dataset name; defaults to the file stem without a ``gnd_`` prefix.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ground-truth file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GroundTruthError(f"{path}: not valid JSON ({e})") from e
        imlist, qimlist, gnd = _validate_ground_truth(data, path)
        name = name or path.stem.removeprefix("gnd_")
        images_dir = Path(images_dir) if images_dir is not None else path.parent / "jpg"
        return cls(name=name, imlist=imlist, qimlist=qimlist, gnd=gnd, images_dir=images_dir)

    def image_path(self, i: int) -> Path:
        """Path of database image ``i`` (not checked for existence; see :meth:`check_images`)."""
        return self.images_dir / f"{self.imlist[i]}{self.ext}"

    def query_path(self, i: int) -> Path:
        """Path of query image ``i``."""
        return self.images_dir / f"{self.qimlist[i]}{self.ext}"

    def query_box(self, i: int) -> tuple[float, float, float, float]:
        """Box ``(x1, y1, x2, y2)`` of query ``i`` in the query image's pixel coordinates."""
        x1, y1, x2, y2 = self.gnd[i]["bbx"]
        return (float(x1), float(y1), float(x2), float(y2))

    def missing_images(self) -> list[Path]:
        """Database and query image files that do not exist."""
        paths = [self.image_path(i) for i in range(len(self.imlist))]
        paths += [self.query_path(i) for i in range(len(self.qimlist))]
        return [p for p in paths if not p.is_file()]

    def check_images(self) -> None:
        """Raise FileNotFoundError naming the first missing image and where the images come from."""
        missing = self.missing_images()
        if missing:
            source = _IMAGE_ARCHIVES.get(self.name, "the dataset's image archive")
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {self.name} missing, first: {missing[0]}. Put the images "
                f"flat (no sub-folders) in {self.images_dir}/; download from {source}."
            )


@dataclass
class R1MDistractors:
    """The revisitop 1M distractor images: relative paths listed in ``revisitop1m.txt``.

    Distractors carry no ground truth; append their descriptors after a dataset's database descriptors so
    that their indices (>= n_db) count as negatives.
    """

    root: Path
    imlist: list[str]

    @classmethod
    def from_root(cls, root: str | Path) -> R1MDistractors:
        """Read ``revisitop1m.txt`` from ``root`` itself or from ``root/revisitop1m/``.

        Lines are paths relative to ``<folder>/jpg/`` with their extension; a line without an extension gets
        ``.jpg`` (as the MATLAB loader does). Blank lines are skipped.
        """
        root = Path(root)
        folder = root if (root / "revisitop1m.txt").is_file() else root / "revisitop1m"
        list_path = folder / "revisitop1m.txt"
        if not list_path.is_file():
            raise FileNotFoundError(
                f"R1M image list not found: {list_path} (nor {root / 'revisitop1m.txt'}). Download "
                f"{_R1M_URL}revisitop1m.txt and the images {_R1M_URL}jpg/revisitop1m.{{1..100}}.tar.gz, "
                f"extracted into {folder / 'jpg'}/."
            )
        lines = (line.strip() for line in list_path.read_text(encoding="utf-8").splitlines())
        imlist = [line if Path(line).suffix else f"{line}.jpg" for line in lines if line]
        return cls(root=folder, imlist=imlist)

    @property
    def images_dir(self) -> Path:
        return self.root / "jpg"

    def __len__(self) -> int:
        return len(self.imlist)

    def image_path(self, i: int) -> Path:
        """Absolute path of distractor ``i``."""
        return (self.images_dir / self.imlist[i]).absolute()

    def image_paths(self) -> list[Path]:
        """Absolute paths of all distractors, in list order."""
        base = self.images_dir.absolute()
        return [base / rel for rel in self.imlist]
