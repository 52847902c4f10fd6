"""Checks on the GPU leases recorded in job logs (saepipe.lease.read_leases)."""

from __future__ import annotations

import itertools


def assert_no_shared_device(leases: list[dict]) -> None:
    """No two leases that overlap in time hold the same device, and some did overlap
    (else there was nothing to check)."""
    overlapping = 0
    for a, b in itertools.combinations(leases, 2):
        if a["start"] < b["end"] and b["start"] < a["end"]:
            overlapping += 1
            assert a["CUDA_VISIBLE_DEVICES"] != b["CUDA_VISIBLE_DEVICES"], (a, b)
    assert overlapping > 0, "no two GPU jobs ran at the same time: nothing was checked"
