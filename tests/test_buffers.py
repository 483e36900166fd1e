import numpy as np
import pytest

from agent.pipeline.buffer import RingBuffer


def _read_all(rb: RingBuffer, max_windows: int = 100):
    out = np.zeros((max_windows, rb.window, rb.channels), np.float32)
    ts = np.zeros(max_windows)
    idx = np.zeros(max_windows, np.int64)
    n = rb.read(out, ts, idx, max_windows)
    return out[:n].copy(), ts[:n].copy(), idx[:n].copy()


def test_windows_every_hop_with_timestamps_of_last_sample():
    rb = RingBuffer(capacity=16, channels=2, window=4, hop=2)
    for i in range(9):
        rb.append(100.0 + i, [i, -i])
    assert rb.ready() == 3  # windows ending at samples 4, 6, 8
    w, ts, idx = _read_all(rb)
    assert idx.tolist() == [4, 6, 8]
    assert ts.tolist() == [103.0, 105.0, 107.0]
    assert w[0, :, 0].tolist() == [0, 1, 2, 3]
    assert w[2, :, 1].tolist() == [-4, -5, -6, -7]
    assert rb.ready() == 0
    rb.append(109.0, [9, -9])
    rb.append(110.0, [10, -10])
    w, _, idx = _read_all(rb)
    assert idx.tolist() == [10]
    assert w[0, :, 0].tolist() == [6, 7, 8, 9]


def test_wrap_around_keeps_windows_contiguous():
    rb = RingBuffer(capacity=7, channels=1, window=5, hop=1)
    got = []
    for i in range(40):
        if rb.append(float(i), [float(i)]):
            w, _, _ = _read_all(rb)
            got.extend(w[:, :, 0].tolist())
    assert len(got) == 36
    for k, win in enumerate(got):
        assert win == [float(k + j) for j in range(5)]
    assert rb.windows_dropped == 0


def test_slow_reader_drops_oldest_windows_and_counts_them():
    rb = RingBuffer(capacity=8, channels=1, window=4, hop=1)
    for i in range(20):
        rb.append(float(i), [float(i)])
    # Only samples 12..19 are still in the buffer: windows ending at 16..20 remain.
    w, _, idx = _read_all(rb)
    assert idx.tolist() == [16, 17, 18, 19, 20]
    assert w[0, :, 0].tolist() == [12, 13, 14, 15]
    assert rb.windows_dropped == 20 - 4 + 1 - 5


def test_frame_larger_than_buffer_keeps_the_tail():
    rb = RingBuffer(capacity=6, channels=2, window=3, hop=3)
    n = 20
    ts = np.arange(n, dtype=np.float64)
    vals = np.stack([np.arange(n), np.arange(n) * 10], axis=1)
    assert rb.extend(ts, vals)
    assert rb.samples_overwritten == 14
    w, ts_out, idx = _read_all(rb)
    # Samples 14..19 are kept; the only complete window in them is samples 15..17.
    assert idx.tolist() == [18]
    assert w[0, :, 1].tolist() == [150, 160, 170]
    assert ts_out.tolist() == [17.0]
    assert rb.windows_dropped == 5  # windows ending at 3, 6, 9, 12, 15 were overwritten


def test_frames_across_the_wrap_point_match_single_appends():
    a = RingBuffer(capacity=10, channels=3, window=4, hop=3)
    b = RingBuffer(capacity=10, channels=3, window=4, hop=3)
    rng = np.random.default_rng(1)
    data = rng.normal(size=(57, 3)).astype(np.float32)
    pos, wa, wb = 0, [], []
    for size in [5, 7, 1, 9, 3, 8, 6, 2, 9, 7]:
        frame = data[pos:pos + size]
        a.extend(np.arange(pos, pos + size, dtype=np.float64), frame)
        for j, row in enumerate(frame):
            b.append(float(pos + j), row.tolist())
        pos += size
        wa.append(_read_all(a)[0])
        wb.append(_read_all(b)[0])
    np.testing.assert_array_equal(np.concatenate(wa), np.concatenate(wb))


def test_bad_geometry_and_frame_shape_are_refused():
    with pytest.raises(ValueError):
        RingBuffer(capacity=4, channels=1, window=8, hop=1)
    with pytest.raises(ValueError):
        RingBuffer(capacity=8, channels=1, window=4, hop=5)
    rb = RingBuffer(capacity=8, channels=2, window=4, hop=1)
    with pytest.raises(ValueError, match="frame shape"):
        rb.extend([1.0, 2.0], [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert rb.total == 0


def test_append_does_not_allocate_per_message():
    import tracemalloc

    rb = RingBuffer(capacity=1024, channels=8, window=16, hop=4)
    row = [1.0] * 8
    for i in range(100):
        rb.append(float(i), row)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(5000):
        rb.append(float(i), row)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename") if s.size_diff > 0)
    assert grown < 4096, f"append grew memory by {grown} bytes over 5000 messages"


def test_reads_of_any_size_across_many_wraps_give_every_window_in_order():
    """Windows that fit before the end of the buffer are copied from a strided view,
    those across the wrap point gathered: both give the windows of the sample history."""
    rng = np.random.default_rng(5)
    ring = RingBuffer(capacity=50, channels=3, window=8, hop=3)
    x = rng.standard_normal((2000, 3)).astype(np.float32)
    out = np.zeros((7, 8, 3), np.float32)
    ts, idx = np.zeros(7), np.zeros(7, np.int64)
    got, ends = [], []
    i = 0
    while i < len(x):
        k = int(rng.integers(1, 12))
        ring.extend(np.arange(i, i + k, dtype=float)[: len(x) - i], x[i:i + k])
        i += k
        n = ring.read(out, ts, idx, int(rng.integers(1, 8)))
        got.append(out[:n].copy())
        ends.append(idx[:n].copy())
        np.testing.assert_array_equal(ts[:n], idx[:n] - 1.0)
    while (n := ring.read(out, ts, idx, 7)) > 0:
        got.append(out[:n].copy())
        ends.append(idx[:n].copy())
    want = np.lib.stride_tricks.sliding_window_view(x, 8, axis=0).transpose(0, 2, 1)[::3]
    assert ring.windows_dropped == 0
    np.testing.assert_array_equal(np.concatenate(ends), np.arange(8, 2001, 3))
    np.testing.assert_array_equal(np.concatenate(got), want)
