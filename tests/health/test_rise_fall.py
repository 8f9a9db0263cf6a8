"""Rise/fall hysteresis as a pure state machine."""

from __future__ import annotations

from forwarder.health.rise_fall import RiseFall


def state(h: RiseFall) -> tuple[bool, bool]:
    return h.up, h.pending


def test_rise_and_fall_need_consecutive_results() -> None:
    h = RiseFall(rise=2, fall=3)
    assert state(h) == (False, False)
    assert h.record(True) is False
    assert state(h) == (False, True)
    assert h.record(False) is False
    assert state(h) == (False, False)  # the run of successes broke
    assert h.record(True) is False
    assert h.record(True) is True
    assert state(h) == (True, False)
    for _ in range(2):
        assert h.record(False) is False
        assert state(h) == (True, True)
    assert h.record(True) is False  # one good answer resets the fall
    assert state(h) == (True, False)
    for _ in range(2):
        assert h.record(False) is False
    assert h.record(False) is True
    assert state(h) == (False, False)


def test_alternating_results_never_change_the_verdict() -> None:
    h = RiseFall(rise=2, fall=2, up=True)
    for i in range(100):
        assert h.record(i % 2 == 0) is False
    assert h.up
