"""User paths in data/: local files or object-store URLs (``gs://``, ``s3://``), never mangled.

Owns the few operations pathlib and ``os.path`` get wrong for URLs (``resolve`` turns ``gs://b/x`` into
``<cwd>/gs:/b/x``; ``normpath`` folds ``//``): making a path absolute, relative to a base, and joining a relative
path onto a base. Everything else goes through ``etils.epath.Path`` directly. Standard library + etils only.
"""

import os
import posixpath

from etils import epath

PathLike = str | os.PathLike


def is_url(path: PathLike) -> bool:
    """Whether ``path`` names an object (``scheme://...``) rather than a local file."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
    """A URL unchanged; a local path made absolute with symlinks resolved."""
    return os.fspath(path) if is_url(path) else os.fspath(epath.Path(path).resolve())


def _split(path: str) -> tuple[str, str]:
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://", "/" + rest
    return "", path


def relative(path: PathLike, base: PathLike) -> str:
    """``path`` relative to the folder ``base`` as a POSIX string (both are made absolute first)."""
    (scheme_a, a), (scheme_b, b) = _split(absolute(path)), _split(absolute(base))
    if scheme_a != scheme_b:
        return absolute(path)
    return posixpath.relpath(a, b)


def join(base: PathLike, relative_path: str) -> str:
    """``base / relative_path`` with ``..`` folded; an absolute ``relative_path`` (or URL) is returned as is."""
    if is_url(relative_path) or os.path.isabs(relative_path):
        return relative_path
    scheme, rest = _split(absolute(base))
    return scheme + posixpath.normpath(posixpath.join(rest, relative_path)).lstrip("/" if scheme else "")
