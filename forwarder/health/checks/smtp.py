"""smtp: the backend greets with 220 and, as deep as configured, would take a message.

A hung JVM still completes the TCP handshake, so only a greeting proves that a sender
would be served.  The time from connect start to the full 220 greeting is recorded
(`Progress.greeting`, then `ProbeResult.greeting`): the core learns its greeting deadline
for real connections from it.  Deeper steps catch a backend that greets but cannot take
mail (its user store or queue down, which a server may first notice at RCPT):
`EHLO <ehlo>` expecting 250, `MAIL FROM:<mail_from>` expecting 250 (an empty mail_from
sends the null sender `<>`), `RCPT TO:<rcpt_to>` expecting 250 or 251; RCPT needs a
transaction, so `rcpt_to` without `mail_from` sends `MAIL FROM:<>` first.  A started
transaction is ended with RSET (250) so that nothing is ever delivered, then QUIT expects
221.  Every failure names the step and the reply it got.

With `send_proxy` the PROXY header goes first, carrying the probe's own addresses (as
HAProxy's check-send-proxy does): a backend that expects the header greets only after it.
Replies are read line by line with a cap per line (LINE_CAP) and on the number of lines
(MAX_REPLY_LINES), so a backend streaming garbage fails fast and costs bounded memory.
"""

from __future__ import annotations

import asyncio
import time

from ...config.model import CheckConfig, Endpoint
from ...net import proxy_protocol
from .common import CheckFailed, Progress, Verdict, connect, quote, read_line, streams

MAX_REPLY_LINES = 64  # a real EHLO reply has a dozen or two


async def check(cfg: CheckConfig, target: Endpoint, progress: Progress,
                send_proxy: str | None = None) -> Verdict:
    commands = _commands(cfg)  # bad config values fail before any connection
    sock, started = await connect(target.host, target.port, progress)
    reader, writer = await streams(sock)
    try:
        if send_proxy:
            src, dst = sock.getsockname(), sock.getpeername()
            writer.write(proxy_protocol.header(send_proxy, src[:2], dst[:2]))
        progress.step = "the greeting"
        code, text = await _reply(reader, "greeting")
        if code != 220:
            raise CheckFailed(f"greeting {_said(code, text)}")
        progress.greeting = time.monotonic() - started
        done = ["220"]
        for line, name, expect in commands:
            progress.step = f"the reply to {line}"
            writer.write(line.encode("ascii") + b"\r\n")
            code, text = await _reply(reader, line)
            if code not in expect:
                raise CheckFailed(f"{line} answered {_said(code, text)}")
            done.append(f"{name} {code}")
        return Verdict(True, ", ".join(done))
    finally:
        writer.transport.abort()


def _commands(cfg: CheckConfig) -> list[tuple[str, str, frozenset[int]]]:
    """(command line, short name, accepted codes) for the steps after the greeting."""
    out: list[tuple[str, str, frozenset[int]]] = []
    if cfg.ehlo:
        out.append((f"EHLO {_arg(cfg.ehlo, 'ehlo')}", "EHLO", frozenset({250})))
    mail_from = cfg.mail_from
    if mail_from is None and cfg.rcpt_to:
        mail_from = ""
    if mail_from is not None:
        out.append((f"MAIL FROM:<{_arg(mail_from, 'mail_from')}>", "MAIL",
                    frozenset({250})))
    if cfg.rcpt_to:
        out.append((f"RCPT TO:<{_arg(cfg.rcpt_to, 'rcpt_to')}>", "RCPT",
                    frozenset({250, 251})))
    if mail_from is not None:
        out.append(("RSET", "RSET", frozenset({250})))
    out.append(("QUIT", "QUIT", frozenset({221})))
    return out


def _arg(value: str, key: str) -> str:
    """A config value put on an SMTP command line: printable ASCII only, or a CR/LF in it
    would smuggle a second command to the backend."""
    if not value.isascii() or not value.isprintable():
        raise CheckFailed(f"{key} {quote(value)} is not printable ASCII; check the config")
    return value


def _said(code: int, text: str) -> str:
    return f"{code} {quote(text)}" if text else str(code)


async def _reply(reader: asyncio.StreamReader, step: str) -> tuple[int, str]:
    """One SMTP reply, multi-line ones included: (code, text of all its lines)."""
    texts: list[str] = []
    for _ in range(MAX_REPLY_LINES):
        line = await read_line(reader, step)
        body = line.rstrip(b"\r\n")
        code, sep = body[:3], body[3:4]
        if not (len(code) == 3 and code.isdigit() and code[:1] in b"2345"
                and sep in (b"", b" ", b"-")):
            raise CheckFailed(f"{step}: not an SMTP reply: {quote(body)}")
        texts.append(body[4:].decode("utf-8", "replace").strip())
        if sep != b"-":
            return int(code), " ".join(t for t in texts if t)
    raise CheckFailed(f"{step}: reply longer than {MAX_REPLY_LINES} lines")
