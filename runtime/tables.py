"""Markdown tables and the number formats of every report (compare, the device loop's summary): one
missing-value convention ("n/a"), `|` escaped in cells, titles wrapped rather than cut. Pure text."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

__all__ = ["MISSING", "md_escape", "fmt_pct", "fmt_num", "fmt_ms", "fmt_ratio", "fmt_shape", "md_table", "wrap_title"]

MISSING = "n/a"  # a value that does not exist (no labels, no samples): never "-", which reads as a number


def md_escape(text: str) -> str:
    """`text` safe inside a markdown table cell."""
    return text.replace("|", "\\|")


def fmt_pct(v: float | None, digits: int = 2) -> str:
    """A fraction as a percentage: 0.1234 -> "12.34 %"."""
    return MISSING if v is None or math.isnan(v) else f"{100 * v:.{digits}f} %"


def fmt_num(v: float | None, digits: int = 4) -> str:
    return MISSING if v is None or math.isnan(v) else f"{v:.{digits}f}"


def fmt_ms(v: float | None, digits: int = 3) -> str:
    """Milliseconds, without the unit (the column header says it)."""
    return MISSING if v is None or math.isnan(v) else f"{v:.{digits}f}"


def fmt_ratio(v: float | None, digits: int = 3) -> str:
    """A ratio: 1.2 -> "1.200x"."""
    return MISSING if v is None or math.isnan(v) else f"{v:.{digits}f}x"


def fmt_shape(shape: Sequence[int | str | None]) -> str:
    """A tensor shape: (batch, 3, ?, ?), a dynamic size without a name as "?"."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> list[str]:
    """A markdown table as lines. Cells are str() of the value, None as MISSING, every one escaped; `align`
    has one letter per column, "l" or "r" (default: the first column left, the others right)."""
    width = len(header)
    align = align or "l" + "r" * (width - 1)
    if len(align) != width:
        raise ValueError(f"{len(align)} alignments for {width} columns")

    def line(cells: Sequence[object]) -> str:
        if len(cells) != width:
            raise ValueError(f"a row of {len(cells)} cells in a table of {width} columns: {list(cells)}")
        text = (MISSING if c is None else md_escape(str(c)) for c in cells)
        return "|" + "|".join(f" {t} " if t else " " for t in text) + "|"

    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [line(header), rule, *(line(r) for r in rows)]


def wrap_title(text: str, width: int = 60) -> str:
    """`text` broken into lines of at most `width` characters at spaces (an overlong word is split), existing
    line breaks kept: for plot titles, which matplotlib would otherwise cut at the figure's edge."""
    out: list[str] = []
    for para in text.split("\n"):
        out += textwrap.wrap(para, width, break_on_hyphens=False) or [""]
    return "\n".join(out)
