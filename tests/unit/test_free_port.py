"""`free_port` (services/tools/brokers/probe.py): the port a local server is told to bind a
moment later must not come from the range the OS hands to outgoing connections, where any
client could take it first."""

from __future__ import annotations

import socket

from services.tools.brokers.probe import _ephemeral_ports, free_port


def test_free_ports_are_below_the_ephemeral_range_and_bindable():
    ephemeral = _ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1  # picked at random, not handed out in sequence
    for port in ports:
        assert port not in ephemeral
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_never_returned(monkeypatch):
    import services.tools.brokers.probe as probe

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy, busy])
        monkeypatch.setattr(probe._random, "randrange", lambda low, high: next(picks, low + 7))
        # the range starts above the busy port (from bind(0): ephemeral, far above 20000), so it may be picked
        monkeypatch.setattr(probe, "_ephemeral_ports", lambda: range(busy + 1, busy + 2))
        port = free_port()
    assert port != busy


def test_a_port_is_never_handed_out_twice_in_a_process(monkeypatch):
    """A stack picks a dozen ports before its servers bind any: a port still free because its
    server has not started yet must not be handed to a second server."""
    import services.tools.brokers.probe as probe

    first = free_port()
    picks = iter([first, first, first + 1])
    monkeypatch.setattr(probe._random, "randrange", lambda low, high: next(picks, low + 11))
    second = free_port()
    assert second != first
    assert {first, second} <= probe._handed_out


def test_a_configured_range_is_where_ports_are_picked(monkeypatch):
    """`make test` runs its broker passes side by side, each with a range of its own
    (ORDERPIPE_TEST_PORT_RANGE, tests/broker_passes.sh), so two passes never pick one port."""
    import pytest

    monkeypatch.setenv("ORDERPIPE_TEST_PORT_RANGE", "23000-23199")
    ports = {free_port() for _ in range(30)}
    assert all(23000 <= port <= 23199 for port in ports) and len(ports) == 30
    for wrong in ("23000", "x-y", "23000-23010", "80-2000", "60000-70000"):
        monkeypatch.setenv("ORDERPIPE_TEST_PORT_RANGE", wrong)
        with pytest.raises(ValueError, match="ORDERPIPE_TEST_PORT_RANGE"):
            free_port()
