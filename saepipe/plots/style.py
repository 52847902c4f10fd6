"""Shared figure conventions: one colour and marker per sweep group in every figure."""
from __future__ import annotations

MARKERS = "osD^v<>ph*P"


def group_styles(groups) -> dict[str, dict]:
    """Group name -> matplotlib kwargs (color, marker), stable for a given set of groups."""
    return {name: dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)])
            for i, name in enumerate(sorted(set(groups)))}
