"""The reports' number formats and markdown tables."""

from __future__ import annotations

import math


def fmt(value, digits=1, suffix="") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def csv_value(value):
    """A value as the CSV files write it: floats to 6 significant digits, the rest as they are."""
    return f"{value:.6g}" if isinstance(value, float) else value


def md_table(header: list[str], rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; with `numeric`, every column but the first is right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 or not numeric else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
