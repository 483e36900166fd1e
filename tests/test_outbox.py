import sqlite3
import subprocess

import pytest

from agent.uplink.outbox import Outbox, OutboxFullError


def _body(seq):
    return {"seq": seq}


def test_seq_is_strictly_increasing_and_survives_reopen(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    seqs = [ob.put("alert", "s", "t", _body) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    ob.ack([1, 2, 3, 4, 5])
    assert len(ob) == 0
    ob.close()
    ob = Outbox(tmp_path / "o.db")
    assert ob.put("alert", "s", "t", _body) == 6  # not reused after every row was acked
    ob.close()


def test_pending_in_seq_order_skipping_inflight(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    for _ in range(6):
        ob.put("alert", "s", "t", _body)
    rows = ob.pending(3, exclude={1, 3})
    assert [r.seq for r in rows] == [2, 4, 5]
    assert rows[0].payload == b'{"seq":2}'
    assert [r.seq for r in ob.pending(10, after=4)] == [5, 6]
    ob.close()


def test_budget_evicts_summaries_before_alerts(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_rows=10)
    for i in range(8):
        ob.put("alert" if i % 2 else "summary", "s", "t", _body)
    for _ in range(6):
        ob.put("alert", "s", "t", _body)
    assert len(ob) == 10
    assert ob.evicted == {"summary": 4}
    kinds = [r.kind for r in ob.pending(100)]
    assert kinds == ["alert"] * 10
    ob.put("alert", "s", "t", _body)
    assert ob.evicted == {"summary": 4, "alert": 1}
    assert ob.pending(1)[0].seq == 4  # the oldest alert (seq 2) went first
    ob.close()
    assert Outbox(tmp_path / "o.db").evicted == {"summary": 4, "alert": 1}


def test_non_json_body_is_refused_before_anything_is_written(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    with pytest.raises(ValueError):
        ob.put("alert", "s", "t", lambda seq: {"seq": seq, "score": float("nan")})
    assert len(ob) == 0
    assert ob.put("alert", "s", "t", _body) == 1
    ob.close()


def test_wal_mode(tmp_path):
    Outbox(tmp_path / "o.db").close()
    db = sqlite3.connect(tmp_path / "o.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _sized(n):
    return lambda seq: {"seq": seq, "pad": "x" * n}


def test_byte_budget_evicts_oldest_summaries_first(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=64 * 1024)
    for i in range(40):
        ob.put("summary" if i % 4 else "alert", "s", "t", _sized(2000))
    assert ob.bytes <= 64 * 1024
    left = ob.pending(100)
    assert sum(r.kind == "alert" for r in left) == 10  # every alert kept
    assert ob.evicted["summary"] == 40 - len(left)
    assert ob.stats()["bytes"] == sum(len(r.payload) for r in left)
    ob.close()


def test_ttl_expires_per_class(tmp_path):
    now = [1000.0]
    ob = Outbox(tmp_path / "o.db", ttl_s={"alert": 100, "summary": 10}, clock=lambda: now[0])
    ob.put("alert", "s", "t", _body)
    ob.put("summary", "s", "t", _body)
    now[0] += 50
    ob.put("summary", "s", "t", _body)
    assert ob.expire() == 1
    assert [r.seq for r in ob.pending(10)] == [1, 3]
    now[0] += 100
    assert ob.expire() == 2
    assert ob.expired == {"summary": 2, "alert": 1}
    assert len(ob) == 0 and ob.bytes == 0
    ob.close()


def test_put_many_is_one_transaction_with_consecutive_seqs(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    seqs = ob.put_many([("summary", "s", "t", _body)] * 5)
    assert seqs == [1, 2, 3, 4, 5]
    ob.close()


def test_pending_by_class(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    for k in ["summary", "alert", "summary", "alert"]:
        ob.put(k, "s", "t", _body)
    assert [r.seq for r in ob.pending(10, kinds=["alert"])] == [2, 4]
    assert [r.seq for r in ob.pending(10, not_kinds=["alert"])] == [1, 3]
    ob.close()


def test_file_ceiling_refuses_new_rows_and_keeps_committed_ones(tmp_path):
    # SQLite's own "database or disk is full" (SQLITE_FULL), reached through the
    # page ceiling the outbox sets on its file.
    ob = Outbox(tmp_path / "o.db", max_bytes=10**9, file_limit_bytes=96 * 1024)
    accepted = []
    with pytest.raises(OutboxFullError):
        for _ in range(1000):
            accepted.append(ob.put("alert", "s", "t", _sized(1000)))
    assert len(accepted) > 5
    assert [r.seq for r in ob.pending(10_000)] == accepted
    ob.ack(accepted[:5])  # space comes back once rows are delivered
    # The refused message never got a seq, so the cloud sees no gap.
    assert ob.put("alert", "s", "t", _body) == accepted[-1] + 1
    ob.close()
    assert len(Outbox(tmp_path / "o.db")) == len(accepted) - 5 + 1


def test_full_disk_keeps_what_was_committed(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        ob = Outbox(mnt / "o.db", synchronous="full")
        accepted = []
        with pytest.raises(OutboxFullError):
            for _ in range(10_000):
                accepted.append(ob.put("alert", "s", "t", _sized(500)))
        assert len(accepted) > 10
        ob.close()
        ob = Outbox(mnt / "o.db")
        assert [r.seq for r in ob.pending(100_000)] == accepted
        ob.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_purge(tmp_path):
    ob = Outbox(tmp_path / "o.db")
    for k in ["summary", "alert", "summary"]:
        ob.put(k, "s", "t", _body)
    assert ob.purge("summary") == 2
    assert ob.evicted == {"summary": 2}
    assert ob.purge() == 1
    assert len(ob) == 0 and ob.bytes == 0
    ob.close()


def test_corrupt_file_gives_a_clear_error(tmp_path):
    (tmp_path / "o.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(OSError, match="cannot open"):
        Outbox(tmp_path / "o.db")
