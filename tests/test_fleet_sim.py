"""A smaller fleet simulation: real device code on many connections through one broker."""

from __future__ import annotations

import time

import pytest
from fleetsim import SimFleet, summarise

from agent.fleet.operator import Broker, push_release
from agent.scoring import find_model, load_card

from .conftest import REPO
from .fleet_support import make_key, release


@pytest.mark.slow
def test_forty_devices_get_the_push_and_a_bad_one_is_refused_everywhere(tmp_path, broker):
    key, pub = make_key(tmp_path)
    base = load_card(find_model("skab-ae", REPO))
    fleet = SimFleet(40, host="127.0.0.1", port=broker.port, root=tmp_path / "devices",
                     trusted={"ops": pub}, base_card=base)
    try:
        fleet.start()
        t_push = time.time()
        push_release(release(tmp_path, key, 2), Broker("127.0.0.1", broker.port),
                     group="default")
        assert fleet.wait(lambda d: d.activated_at is not None, 60), \
            [(d.device_id, d.state) for d in fleet.devices if d.activated_at is None]
        figures = summarise(fleet, t_push, {}, {})
        assert figures["active"] == 40 and figures["errors"] == 0
        for d in fleet.devices:
            assert d.card.version == 2
            assert d.receiver.store.load_active("skab-ae").version == 2
        # A forged v3 (signed by an untrusted key) is refused by every device.
        other, _ = make_key(tmp_path, "intruder")
        push_release(release(tmp_path, other, 3), Broker("127.0.0.1", broker.port),
                     group="default")
        assert fleet.wait(lambda d: d.receiver.refusals >= 1, 30)
        assert all(d.card.version == 2 for d in fleet.devices)
    finally:
        fleet.stop()
