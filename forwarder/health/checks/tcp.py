"""tcp: the backend's port completes a TCP handshake.

The weakest proof of life (a hung JVM still completes handshakes: use smtp for a mail
server), but the one every service gives.  The socket is closed with a RST at once
(`net.sockets.reset`): a FIN would leave a TIME_WAIT entry on our side for every probe,
and a probe every two seconds per backend would slowly fill the port range.
"""

from __future__ import annotations

from ...config.model import CheckConfig, Endpoint
from ...net.sockets import reset
from .common import Progress, Verdict, connect


async def check(cfg: CheckConfig, target: Endpoint, progress: Progress) -> Verdict:
    sock, _ = await connect(target.host, target.port, progress)
    reset(sock)
    return Verdict(True, f"connected to {target}")
