"""Finding the images of a folder, and telling which entries cannot be read as image files.

A folder of photos holds more than photos: symbolic links (some broken, some in loops), named pipes,
devices, names that are not valid UTF-8, folders that cannot be listed. :func:`scan_images` never stops
or blocks on one of them: it returns the image files and, separately, every skipped entry under its own
path in the folder with the reason, so an index can report them.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

#: File extensions taken for images (lower case).
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .jfif .heic .avif".split()
)

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


@dataclass
class FolderScan:
    """What :func:`scan_images` found: image files, and the entries it skipped with the reason."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def entry_path(path: str | Path) -> Path:
    """The path an entry is known by: absolute, its folder resolved, the entry itself not followed (a link
    is recorded as the link, in its folder, not as its target)."""
    p = Path(os.path.abspath(path))
    return p.parent.resolve() / p.name


def display_path(path: str | Path) -> str:
    """``path`` as text: a name that is not valid UTF-8 shows its bytes as ``\\xNN`` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def unreadable_reason(path: str | Path) -> str | None:
    """Why the entry at ``path`` cannot be read as an image file, or None when it is a regular file (or a
    link to one) with a valid UTF-8 name. Never opens the entry, so it never blocks (named pipes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "the file name is not valid UTF-8: rename the file"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return "symlink loop"
            if err.errno == errno.ENOENT:
                return f"broken symlink (to {display_path(os.readlink(path))})"
            return f"cannot follow the symlink: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')})"
    return None


def scan_images(root: str | Path) -> FolderScan:
    """The image files under ``root`` (recursively, by extension, hidden entries skipped), sorted, and the
    entries with an image extension (or folders) that cannot be read, each with the reason.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.is_dir():
        if not os.path.lexists(root):
            raise FileNotFoundError(f"no such folder: {root}")
        p = entry_path(root)
        reason = unreadable_reason(p)
        return FolderScan([p]) if reason is None else FolderScan([], [(p, reason)])
    root = root.resolve()
    scan = FolderScan()

    def unlistable(err: OSError) -> None:
        scan.skipped.append((entry_path(err.filename), f"cannot read the folder: {err.strerror}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                p = Path(dirpath) / f
                reason = unreadable_reason(p)
                if reason is None:
                    scan.images.append(p)
                else:
                    scan.skipped.append((p, reason))
    scan.images.sort()
    scan.skipped.sort(key=lambda e: display_path(e[0]))
    return scan


def find_images(root: str | Path) -> list[Path]:
    """The image files under ``root`` (see :func:`scan_images`), sorted."""
    return scan_images(root).images
