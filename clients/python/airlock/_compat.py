"""What a missing attribute of a frame or an expression raises.

A polars method the client does not implement raises :class:`NotImplementedError` naming
it (``Expr.rolling_mean() ...``), never an ``AttributeError`` that reads as if the object
were broken. Any other missing name (a typo, a private or dunder probe such as
``_repr_html_`` or ``__array__``) stays an ``AttributeError``, so ``hasattr`` and other
libraries' probes behave as usual.
"""

from __future__ import annotations

import sys

from ._polars_names import POLARS_NAMES

__all__ = ["missing_attribute"]

_HINT = (
    "build it from the supported methods, or send SQL with client.sql(...); "
    "whether a query may run is always the server's decision"
)


def _live_polars_names(owner: str) -> set[str]:
    """Names from an already imported polars (never imported here: it is optional)."""
    pl = sys.modules.get("polars")
    if pl is None:
        return set()
    try:
        target = {
            "Expr": lambda: pl.Expr,
            "Expr.str": lambda: pl.col("x").str,
            "Expr.dt": lambda: pl.col("x").dt,
            "LazyFrame": lambda: pl.LazyFrame,
            "GroupBy": lambda: pl.lazyframe.group_by.LazyGroupBy,
            "polars": lambda: pl,
        }[owner]()
        return {n for n in dir(target) if not n.startswith("_")}
    except Exception:  # a polars without one of these: the static list still answers
        return set()


def is_polars_name(owner: str, name: str) -> bool:
    if name.startswith("_"):
        return False
    return name in POLARS_NAMES.get(owner, ()) or name in _live_polars_names(owner)


def missing_attribute(owner: str, obj: object, name: str) -> Exception:
    """The exception for ``obj.name`` when ``obj`` (shown as ``owner``) lacks ``name``."""
    shown = owner if owner.startswith("Expr") else type(obj).__name__
    if is_polars_name(owner, name):
        what = "airlock" if owner == "polars" else shown
        return NotImplementedError(
            f"{what}.{name}() (polars' {'pl' if owner == 'polars' else owner}.{name}) is not implemented "
            f"by the Airlock client; {_HINT}"
        )
    if isinstance(obj, type(sys)):
        return AttributeError(f"module {obj.__name__!r} has no attribute {name!r}")
    return AttributeError(f"{shown!r} object has no attribute {name!r}")
