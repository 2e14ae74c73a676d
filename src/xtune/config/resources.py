"""Where the packaged config groups, recipes and assets live (source tree or installed wheel)."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent.parent  # src/xtune or site-packages/xtune


def _first_existing(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"xtune installation is incomplete: none of {', '.join(map(str, candidates))} exists")


def conf_dir() -> Path:
    # A wheel carries conf/ inside the package; a source checkout has it at the repository root.
    return _first_existing(_PKG / "conf", _PKG.parent.parent / "conf")


def recipes_dir() -> Path:
    return _first_existing(_PKG / "recipes", _PKG.parent.parent / "recipes")


def assets_dir() -> Path:
    return _PKG / "assets"
