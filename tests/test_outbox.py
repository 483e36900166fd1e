import sqlite3

import pytest

from agent.outbox import Outbox


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
    assert ob.evicted == {"summary": 4, "alert": 0}
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
