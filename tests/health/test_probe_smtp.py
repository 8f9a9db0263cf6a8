"""smtp check against a real aiosmtpd (in the test's loop) and tiny raw servers for what
aiosmtpd would never do: refuse at the greeting, hang mid-dialogue, send garbage, endless
or overlong replies, greet slowly near the timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health.probe import run_check
from forwarder.net import proxy_protocol

from .conftest import Run
from .servers import INSIDE, LATE, OUTSIDE, Handler, T, answer, refusing_port, serve, silent

SMTP_CHECK = CheckConfig(kind="smtp", timeout=T)
DEEP = CheckConfig(kind="smtp", timeout=1.0, ehlo="probe.example.org",
                   mail_from="probe@example.org", rcpt_to="postmaster@example.org")


class Recorder:
    """aiosmtpd handler that records the dialogue; `rcpt_reply` refuses recipients."""

    def __init__(self, rcpt_reply: str | None = None) -> None:
        self.seen: list[str] = []
        self.rcpt_reply = rcpt_reply
        self.proxy: Any = None

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        self.seen.append(f"EHLO {hostname}")
        session.host_name = hostname  # what aiosmtpd does when no hook is set
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.seen.append(f"MAIL <{address}>")
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.seen.append(f"RCPT <{address}>")
        return self.rcpt_reply or "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append("DATA")
        return "250 accepted"

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append("RSET")
        return "250 OK"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.seen.append("QUIT")
        return "221 Bye"

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any,
                           proxy_data: Any) -> bool:
        self.proxy = proxy_data
        return True


@contextlib.asynccontextmanager
async def aiosmtpd(handler: Recorder, **kw: Any) -> AsyncIterator[Endpoint]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="backend.test", loop=loop, **kw), "127.0.0.1", 0)
    try:
        yield Endpoint("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def dialogue(greeting: bytes, replies: dict[bytes, bytes], delay: float = 0.0,
             seen: list[bytes] | None = None) -> Handler:
    """A raw SMTP-ish server: `greeting` (after `delay`), then the reply to each command
    by its verb; a verb it has no reply for is never answered (a hang)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if delay:
            await asyncio.sleep(delay)  # the behaviour under test: a slow backend
        writer.write(greeting)
        while line := await reader.readline():
            if seen is not None:
                seen.append(line)
            verb = line.split(b":", 1)[0].split(b" ", 1)[0].strip().upper()
            if verb not in replies:
                await reader.read()
                return
            writer.write(replies[verb])
    return handler


QUIT_OK = {b"QUIT": b"221 bye\r\n"}


# ---------------------------------------------------------------------------------------
# up


def test_greeting_and_quit(run: Run) -> None:
    async def main() -> None:
        rec = Recorder()
        async with aiosmtpd(rec) as ep:
            res = await run_check(SMTP_CHECK, ep)
        assert (res.ok, res.result, res.detail) == (True, "success", "220, QUIT 221"), res
        assert res.greeting is not None and 0 < res.greeting <= res.duration
        assert rec.seen == ["QUIT"]
    run(main())


def test_deep_check_walks_the_transaction_and_never_sends_data(run: Run) -> None:
    async def main() -> None:
        rec = Recorder()
        async with aiosmtpd(rec) as ep:
            res = await run_check(DEEP, ep)
        assert res.ok, res
        assert res.detail == "220, EHLO 250, MAIL 250, RCPT 250, RSET 250, QUIT 221"
        assert rec.seen == ["EHLO probe.example.org", "MAIL <probe@example.org>",
                            "RCPT <postmaster@example.org>", "RSET", "QUIT"]
    run(main())


def test_empty_mail_from_is_the_null_sender(run: Run) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        ok = {b"EHLO": b"250 hi\r\n", b"MAIL": b"250 ok\r\n", b"RCPT": b"251 forwarded\r\n",
              b"RSET": b"250 ok\r\n", **QUIT_OK}
        async with serve(dialogue(b"220 hi\r\n", ok, seen=seen)) as srv:
            for cfg in (CheckConfig(kind="smtp", ehlo="p", mail_from=""),
                        CheckConfig(kind="smtp", ehlo="p", rcpt_to="pm@example.org")):
                seen.clear()
                res = await run_check(cfg, srv.endpoint)
                assert res.ok, res
                assert seen[1] == b"MAIL FROM:<>\r\n"
        # the last one: RCPT without mail_from sends MAIL FROM:<> first; 251 is accepted
        assert seen == [b"EHLO p\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<pm@example.org>\r\n",
                        b"RSET\r\n", b"QUIT\r\n"]
    run(main())


def test_multiline_greeting(run: Run) -> None:
    async def main() -> None:
        greeting = b"220-mx.example.org ESMTP\r\n220-no UCE\r\n220 ready\r\n"
        async with serve(dialogue(greeting, QUIT_OK)) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert res.ok and res.greeting is not None, res
    run(main())


@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_proxy_header_first_with_the_probes_own_addresses(run: Run, send_proxy: str) -> None:
    async def main() -> None:
        seen = bytearray()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            size = 4096 if send_proxy == "v1" else 28  # v2 with IPv4: 16 + 12 bytes
            if send_proxy == "v1":
                seen.extend(await reader.readline())
            else:
                seen.extend(await reader.readexactly(size))
            src = writer.get_extra_info("peername")
            dst = writer.get_extra_info("sockname")
            assert bytes(seen) == proxy_protocol.header(send_proxy, src, dst)
            writer.write(b"220 hi\r\n")
            if await reader.readline() == b"QUIT\r\n":
                writer.write(b"221 bye\r\n")
            await reader.read()

        async with serve(handler) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint, send_proxy=send_proxy)
            assert res.ok, res
        assert seen.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 " if send_proxy == "v1"
                               else proxy_protocol.V2_SIGNATURE)
    run(main())


def test_proxy_header_read_by_aiosmtpd(run: Run) -> None:
    async def main() -> None:
        rec = Recorder()
        async with aiosmtpd(rec, proxy_protocol_timeout=3) as ep:
            res = await run_check(DEEP, ep, send_proxy="v2")
        assert res.ok, res
        assert rec.proxy is not None and str(rec.proxy.src_addr) == "127.0.0.1"
        assert rec.seen[0] == "EHLO probe.example.org"
    run(main())


@pytest.mark.parametrize("delay", [pytest.param(INSIDE, id="inside")])
def test_slow_greeting_just_inside_the_timeout(run: Run, delay: float) -> None:
    async def main() -> None:
        async with serve(dialogue(b"220 slow\r\n", QUIT_OK, delay=delay)) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert res.ok, res
        assert res.greeting is not None and delay <= res.greeting < T
    run(main())


# ---------------------------------------------------------------------------------------
# down


@pytest.mark.parametrize("reply", ["451 4.3.0 user store unavailable",
                                   "550 5.1.1 no such user"])
def test_greets_but_refuses_the_recipient(run: Run, reply: str) -> None:
    """The James case: port open, 220 at once, but the user store is down."""
    async def main() -> None:
        rec = Recorder(rcpt_reply=reply)
        async with aiosmtpd(rec) as ep:
            res = await run_check(DEEP, ep)
        assert (res.ok, res.result) == (False, "failure"), res
        code, text = reply.split(" ", 1)
        assert res.detail == f"RCPT TO:<postmaster@example.org> answered {code} '{text}'"
        assert res.greeting is not None  # the greeting was fine, and is still reported
        assert "DATA" not in rec.seen
    run(main())


def test_refusing_greeting(run: Run) -> None:
    async def main() -> None:
        async with serve(dialogue(b"554 5.3.2 no service here\r\n", QUIT_OK)) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert (res.ok, res.detail) == (False, "greeting 554 '5.3.2 no service here'"), res
        assert res.greeting is None
    run(main())


@pytest.mark.parametrize("step, cfg, replies, detail", [
    ("EHLO", CheckConfig(kind="smtp", ehlo="p"), {b"EHLO": b"502 not here\r\n"},
     "EHLO p answered 502 'not here'"),
    ("MAIL", CheckConfig(kind="smtp", ehlo="p", mail_from="a@b"),
     {b"EHLO": b"250 hi\r\n", b"MAIL": b"421 4.3.2 shutting down\r\n"},
     "MAIL FROM:<a@b> answered 421 '4.3.2 shutting down'"),
    ("QUIT", SMTP_CHECK, {b"QUIT": b"250 what\r\n"}, "QUIT answered 250 'what'"),
    ("RSET", CheckConfig(kind="smtp", ehlo="p", mail_from=""),
     {b"EHLO": b"250 hi\r\n", b"MAIL": b"250 ok\r\n", b"RSET": b"500\r\n"},
     "RSET answered 500"),
])
def test_each_step_says_which_reply_it_got(run: Run, step: str, cfg: CheckConfig,
                                           replies: dict[bytes, bytes], detail: str) -> None:
    async def main() -> None:
        async with serve(dialogue(b"220 hi\r\n", replies)) as srv:
            res = await run_check(cfg, srv.endpoint)
        assert (res.ok, res.result, res.detail) == (False, "failure", detail), res
    run(main())


def test_closed_before_the_quit_reply(run: Run) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 hi\r\n")
            await reader.readline()
            writer.close()  # a FIN, no reply

        async with serve(handler) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert (res.ok, res.detail) == (False, "QUIT: connection closed before a reply"), res
    run(main())


def test_refused(run: Run) -> None:
    async def main() -> None:
        with refusing_port() as ep:
            res = await run_check(SMTP_CHECK, ep)
        assert (res.ok, res.result) == (False, "failure")
        assert res.detail == f"connect to {ep}: connection refused (nothing listening)"
    run(main())


def test_config_value_with_a_line_break_is_never_sent(run: Run) -> None:
    async def main() -> None:
        async with serve(dialogue(b"220 hi\r\n", QUIT_OK)) as srv:
            cfg = CheckConfig(kind="smtp", ehlo="p\r\nDATA")
            res = await run_check(cfg, srv.endpoint)
            assert srv.connections == 0
        assert not res.ok
        assert res.detail == "ehlo 'p\\r\\nDATA' is not printable ASCII; check the config"
    run(main())


# ---------------------------------------------------------------------------------------
# garbage


@pytest.mark.parametrize("sent, detail", [
    (b"HTTP/1.1 400 Bad Request\r\n", "greeting: not an SMTP reply: 'HTTP/1.1 400 Bad Request'"),
    (b"\x1b[2J\x00boom\r\n", "greeting: not an SMTP reply: '\\x1b[2J\\x00boom'"),
    (b"22\r\n", "greeting: not an SMTP reply: '22'"),
    (b"220" + b"x" * 2000 + b"\r\n", "greeting: line longer than 512 bytes"),
    (b"220-more\r\n" * 100, "greeting: reply longer than 64 lines"),
    (b"220 no line end", "greeting: connection closed in the middle of a line: '220 no line end'"),
])
def test_garbage_greeting(run: Run, sent: bytes, detail: str) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(sent)
            if not sent.endswith(b"\n"):
                writer.write_eof()
            await reader.read()

        async with serve(handler) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert (res.ok, res.result, res.detail) == (False, "failure", detail), res
        assert all(c.isprintable() for c in res.detail)
    run(main())


def test_endless_line_costs_one_line_cap(run: Run) -> None:
    """A backend streaming bytes without a newline: the check fails at the cap at once,
    it does not wait for the timeout or read what follows."""
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for _ in range(1000):
                writer.write(b"x" * 65536)
                await writer.drain()

        async with serve(handler) as srv:
            res = await run_check(CheckConfig(kind="smtp", timeout=2.0), srv.endpoint)
        assert res.detail == "greeting: line longer than 512 bytes", res
        assert res.duration < 1.0
    run(main())


# ---------------------------------------------------------------------------------------
# timeouts


def test_hung_backend_times_out_waiting_for_the_greeting(run: Run) -> None:
    async def main() -> None:
        async with serve(silent) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.detail == f"timed out after {T:g}s waiting for the greeting"
        assert T - 0.01 <= res.duration < T + LATE
    run(main())


def test_slow_greeting_just_outside_the_timeout(run: Run) -> None:
    async def main() -> None:
        async with serve(dialogue(b"220 slow\r\n", QUIT_OK, delay=OUTSIDE)) as srv:
            res = await run_check(SMTP_CHECK, srv.endpoint)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.greeting is None
    run(main())


def test_hang_at_rcpt_keeps_the_greeting_latency(run: Run) -> None:
    async def main() -> None:
        replies = {b"EHLO": b"250-hi\r\n250 8BITMIME\r\n", b"MAIL": b"250 ok\r\n"}
        async with serve(dialogue(b"220 hi\r\n", replies)) as srv:
            cfg = CheckConfig(kind="smtp", timeout=T, ehlo="p", mail_from="", rcpt_to="pm@x")
            res = await run_check(cfg, srv.endpoint)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.detail == f"timed out after {T:g}s waiting for the reply to RCPT TO:<pm@x>"
        assert res.greeting is not None and res.greeting < T
    run(main())


def test_old_probe_still_answers(run: Run) -> None:
    """backends.py calls `probe(kind, ep, timeout, send_proxy)` until it moves over."""
    from forwarder.health.probe import probe

    async def main() -> None:
        async with serve(answer(b"220 hi\r\n221 bye\r\n")) as srv:
            res = await probe("smtp", srv.endpoint, T)
        assert (res.ok, res.detail) == (True, "220/221"), res
    run(main())
