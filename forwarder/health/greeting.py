"""The greeting deadline of one backend: how long a connection waits for the backend's
first byte (smtp mode) before it is given to the next backend or answered 421.

A fixed deadline has to be long enough for the slowest healthy greeting, so it is mostly
dead time: a healthy James greets in about a millisecond, and with the first build's fixed
10 s a backend that hung just before a message cost every sender 10 s.  With
`greeting_timeout = "auto"` (the default) the deadline is learned from this backend's own
recent probe greetings:

    deadline = min(greeting_timeout_max, max(FLOOR, FACTOR x p99 of the last SAMPLES))

A backend greeting in ~1 ms gets FLOOR (1 s); one that greets after 3 s on purpose
(Sendmail's greet_pause) gets 60 s, capped at greeting_timeout_max (10 s by default), so it
is never cut off.  Until a probe has greeted there is no sample and the cap applies (no
traffic goes to such a backend anyway: it is not up yet).

Why a false 421 is cheap: a sender treats a 421 greeting as a temporary failure of this
host and tries its next MX at once (RFC 5321 §3.8; measured with Sendmail, Postfix and Exim
in tests/e2e).  It is not cheap for a domain with a single MX: the message waits in the
sender's queue for its next retry (minutes).  An operator who has a single MX, or a backend
whose greeting time swings by more than FACTOR, sets a number instead: a fixed deadline.
"""

from __future__ import annotations

import math
from collections import deque

SAMPLES = 64
FACTOR = 20.0
FLOOR = 1.0


class GreetingDeadline:
    __slots__ = ("ceiling", "fixed", "samples", "seconds")

    def __init__(self, fixed: float | None, ceiling: float) -> None:
        self.fixed = fixed  # None: learned ("auto")
        self.ceiling = ceiling
        self.samples: deque[float] = deque(maxlen=SAMPLES)
        self.seconds = fixed if fixed is not None else ceiling

    def configure(self, fixed: float | None, ceiling: float) -> None:
        self.fixed, self.ceiling = fixed, ceiling
        self._update()

    def observe(self, greeting: float) -> None:
        """A probe's greeting latency (connect start to the full 220 line), seconds."""
        self.samples.append(greeting)
        self._update()

    def _update(self) -> None:
        if self.fixed is not None:
            self.seconds = self.fixed
        elif not self.samples:
            self.seconds = self.ceiling
        else:
            ordered = sorted(self.samples)
            p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
            self.seconds = min(self.ceiling, max(FLOOR, FACTOR * p99))

    def status(self) -> dict[str, object]:
        return {"seconds": round(self.seconds, 4), "mode": "fixed" if self.fixed is not None
                else "auto", "samples": len(self.samples)}
