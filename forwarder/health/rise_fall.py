"""Rise/fall hysteresis as a pure state machine (no clock, no I/O).

A backend is declared up after `rise` consecutive good results and down after `fall`
consecutive bad ones; anything in between keeps the current verdict, so one slow answer
near the timeout does not flap the gate.  Probes and passive failures (real traffic that
could not connect or got no greeting) feed the same counter.
"""

from __future__ import annotations


class RiseFall:
    __slots__ = ("fails", "fall", "oks", "rise", "up")

    def __init__(self, rise: int, fall: int, up: bool = False) -> None:
        self.rise, self.fall = rise, fall
        self.up = up
        self.oks = 0
        self.fails = 0

    @property
    def pending(self) -> bool:
        """A change has started but is not confirmed yet (probe faster meanwhile)."""
        return self.oks > 0 if not self.up else self.fails > 0

    def record(self, ok: bool) -> bool:
        """Count one result; True when the verdict changed."""
        if ok:
            self.oks += 1
            self.fails = 0
            if not self.up and self.oks >= self.rise:
                self.up = True
                return True
        else:
            self.fails += 1
            self.oks = 0
            if self.up and self.fails >= self.fall:
                self.up = False
                return True
        return False
