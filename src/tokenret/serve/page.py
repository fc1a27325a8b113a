"""The web page of ``tokenret serve`` (``GET /``), kept as package data in ``static/`` so it is edited as
HTML and shipped inside the wheel; read with :mod:`importlib.resources`, from the source tree (editable
install) or the installed package alike."""

from __future__ import annotations

from functools import cache
from importlib import resources

#: The page, relative to the ``tokenret.serve`` package.
PAGE_RESOURCE = "static/index.html"


@cache
def index_html() -> bytes:
    """The search page (upload a query image, optionally a box; see the top-k), as UTF-8 bytes.

    Raises:
        FileNotFoundError: the package was installed without its data files.
    """
    page = resources.files("tokenret.serve").joinpath(PAGE_RESOURCE)
    try:
        return page.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the web page {page} is missing: tokenret was installed without its package data "
            "(pyproject.toml [tool.setuptools.package-data]); reinstall it with pip"
        ) from err
