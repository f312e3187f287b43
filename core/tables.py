"""Reading text tables, and the one rule for a ratio with nothing to count.

:func:`read_text_csv` reads every cell as text: landmark ids like ``"0123"`` must survive, and an
empty cell stays an empty string rather than becoming NaN.

:func:`ratio` is the project's single convention for an empty denominator: the ratio is
undefined, ``NaN`` — never a made-up 0 or 1 that would look like a measurement. JSON has no NaN,
so writers pass values through :func:`json_number`, which turns it into ``null``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pandas as pd

from core.errors import UserError

__all__ = ["json_number", "ratio", "read_text_csv"]


def read_text_csv(path: str | os.PathLike, what: str = "CSV file",
                  error: type[UserError] = UserError) -> pd.DataFrame:
    """A CSV with every cell as text, or ``error`` naming the file (``"<what> not found: ..."``).

    ``error`` lets a reader raise its own subclass (e.g. ``ManifestError``) for the same cases.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} is a folder, not a file: {path}")
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():
            # A first data row longer than the header (a trailing comma on every line, an unquoted
            # comma in a value) makes pandas take the first column as the index by default, which
            # shifts every column silently; index_col=False turns it into this warning, raised here.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.ParserWarning:
        raise error(f"{path}: line 2 has more fields than the header's columns (a trailing comma, or an unquoted "
                    "comma in a value?)") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise error(f"{path}: not a readable CSV ({err})") from err


def ratio(num: float, den: float) -> float:
    """``num / den``, or NaN when ``den`` is 0 (undefined: nothing was counted)."""
    return float(num) / float(den) if den else math.nan


def json_number(value: float | None, digits: int | None = None) -> float | None:
    """``value`` for a JSON file: rounded if asked, and ``None`` (null) for NaN or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), digits) if digits is not None else float(value)
