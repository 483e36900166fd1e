"""Issue 12's measured promises (slow): attempts against a refusing broker over 20 s, peak RSS
under an oversize flood, recovery after a full disk. Same code as scripts/probe_reliability.py,
which prints the figures in docs/reliability.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from probe_reliability import full_disk_recovery, oversize_flood, refusing_broker_attempts

pytestmark = pytest.mark.slow


def test_backoff_grows_against_a_refusing_broker(tmp_path: Path) -> None:
    r = refusing_broker_attempts(tmp_path, 20.0, min_s=1.0, max_s=8.0)
    # Doubling from 1 s (+-25 %) to the 8 s cap: about 5 attempts in 20 s. The old
    # code re-set paho's delay on every failure and tried 21 times (about 1 a second).
    assert 3 <= r["attempts"] <= 8, r


def test_oversize_flood_keeps_peak_rss_bounded(tmp_path: Path) -> None:
    r = oversize_flood(tmp_path, sizes_mb=(33, 10), per_size=3)
    assert r["alive"], r
    # The old agent decoded a 33 MB frame into 363 MB peak RSS (over MemoryMax=256M).
    # Now only paho's copy of the packet is held, briefly.
    assert r["peak_rss_after_mb"] <= 192, r  # the unit's MemoryHigh
    assert r["peak_rss_after_mb"] - r["peak_rss_before_mb"] <= 110, r


def test_full_disk_recovers_within_seconds_of_space_returning(tmp_path: Path) -> None:
    probe = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path)],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {probe.stderr.strip()}")
    subprocess.run(["umount", str(tmp_path)], check=True)
    r = full_disk_recovery(tmp_path)
    assert r["degraded_until_freed"] and r["queued_in_memory"] >= 1, r
    assert r["healthy_after_s"] <= 5, r  # retried every second while degraded
    assert r["contiguous"] and r["seqs_delivered"] == r["last_seq"], r
