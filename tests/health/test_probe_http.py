"""http check against an aiohttp.web server in the test's loop that speaks Apache James's
webadmin /healthcheck contract (200 healthy or degraded with its JSON, 503 unhealthy with
the causes), redirects, streams endless bodies, answers slowly; raw servers for what no
HTTP server sends (garbage, a status line and then nothing); https with a certificate
the check must verify."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from forwarder.config.model import CheckConfig, Endpoint
from forwarder.health.checks import http as http_check
from forwarder.health.probe import run_check

from .conftest import Run
from .servers import INSIDE, LATE, OUTSIDE, T, answer, refusing_port, serve

BACKEND = Endpoint("127.0.0.1", 25)  # the SMTP backend: the http check need not use it

CAUSE = "Cassandra: All host(s) tried for query failed (no host was tried)"


def james(state: str) -> dict[str, object]:
    """A James webadmin /healthcheck document with the overall `state`."""
    checks: list[dict[str, object]] = [
        {"componentName": "Guice application lifecycle",
         "escapedComponentName": "Guice%20application%20lifecycle",
         "status": "healthy", "cause": None}]
    if state == "degraded":
        checks.append({"componentName": "RabbitMQ backend", "status": "degraded",
                       "cause": "slow \x1b[31mconsumers\x00"})
    if state == "unhealthy":
        checks.append({"componentName": "Cassandra backend", "status": "unhealthy",
                       "cause": CAUSE})
    return {"status": state, "checks": checks}


async def healthcheck(request: web.Request) -> web.Response:
    state = request.query.get("state", "healthy")
    status = int(request.query.get("code", 503 if state == "unhealthy" else 200))
    return web.json_response(james(state), status=status)


async def redirect(request: web.Request) -> web.Response:
    n = int(request.match_info["n"])
    if n == 0:
        return web.json_response(james("healthy"))
    raise web.HTTPFound(f"/redirect/{n - 1}")


async def elsewhere(request: web.Request) -> web.Response:
    raise web.HTTPTemporaryRedirect(request.query["to"])


async def huge(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": request.query.get("type", "text/plain")})
    await resp.prepare(request)
    await resp.write(b'{"status": "healthy", "pad": "')
    while True:  # endless: only a reader that stops at its cap ever finishes
        await resp.write(b" " * 65536)


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query["delay"]))  # the behaviour under test
    return web.json_response(james("healthy"))


async def status(request: web.Request) -> web.Response:
    return web.Response(status=int(request.match_info["code"]), text="hello")


def app() -> web.Application:
    a = web.Application()
    a.router.add_get("/healthcheck", healthcheck)
    a.router.add_get("/redirect/{n}", redirect)
    a.router.add_get("/elsewhere", elsewhere)
    a.router.add_get("/huge", huge)
    a.router.add_get("/slow", slow)
    a.router.add_get("/status/{code}", status)
    return a


@contextlib.asynccontextmanager
async def webapp(tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    runner = web.AppRunner(app(), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def http(url: str, **kw: object) -> CheckConfig:
    return CheckConfig(kind="http", url=url, timeout=kw.pop("timeout", T), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# James's /healthcheck


def test_healthy(run: Run) -> None:
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/healthcheck"), BACKEND)
        assert (res.ok, res.result, res.detail, res.drain) == (True, "success",
                                                               "HTTP 200, healthy", False)
    run(main())


@pytest.mark.parametrize("degraded, drain", [("up", False), ("drain", True)])
def test_degraded_counts_as_configured(run: Run, degraded: str, drain: bool) -> None:
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/healthcheck?state=degraded",
                                       degraded=degraded), BACKEND)
        assert (res.ok, res.result, res.drain) == (True, "success", drain), res
        # the component and its cause, escaped
        assert res.detail.startswith(
            "HTTP 200, degraded: 'RabbitMQ backend' degraded ('slow \\x1b[31mconsumers\\x00')")
        assert res.detail.endswith("; draining") is drain
    run(main())


def test_unhealthy_names_the_components_and_causes(run: Run) -> None:
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/healthcheck?state=unhealthy"), BACKEND)
            assert (res.ok, res.result) == (False, "failure"), res
            assert res.detail == f"HTTP 503, unhealthy: 'Cassandra backend' unhealthy ('{CAUSE}')"
            # the document wins over the status code, both ways
            res = await run_check(http(f"{base}/healthcheck?state=unhealthy&code=200"),
                                  BACKEND)
            assert not res.ok and res.detail.startswith("HTTP 200, unhealthy: "), res
            res = await run_check(http(f"{base}/healthcheck?state=unhealthy",
                                       expect_status=(503,)), BACKEND)
            assert not res.ok, res
    run(main())


def test_document_judged_without_a_server() -> None:
    """The parts of the contract a server does not vary: many components, odd types."""
    doc = {"status": "Unhealthy", "checks": [
        {"componentName": f"c{i}", "status": "unhealthy", "cause": i} for i in range(8)]
        + [{"componentName": "fine", "status": "healthy"}, "junk", {"status": 3}]}
    state, summary = http_check.health_document(json.dumps(doc).encode()) or ("", "")
    assert state == "unhealthy"
    assert summary.startswith("'c0' unhealthy ('0'), 'c1' unhealthy ('1'), ")
    assert summary.endswith(" and 4 more")
    for body in (b"", b"[1]", b"{not json", b'{"status": "UP"}', b"{" * 50000,
                 b'{"status": "healthy", "checks": 7}', b"\xff\xfe{"):
        doc_or_none = http_check.health_document(body)
        assert doc_or_none in (None, ("healthy", "")), body[:20]


# ---------------------------------------------------------------------------------------
# status codes, redirects, bodies


def test_status_codes(run: Run) -> None:
    async def main() -> None:
        async with webapp() as base:
            cases = [
                (http(f"{base}/status/204"), True, "HTTP 204"),
                (http(f"{base}/status/500"), False, "HTTP 500 (expected a 2xx)"),
                (http(f"{base}/status/404", expect_status=(404, 410)), True, "HTTP 404"),
                (http(f"{base}/status/200", expect_status=(204,)), False,
                 "HTTP 200 (expected 204)"),
                (http(f"{base}/healthcheck", expect_status=(204,)), False,
                 "HTTP 200, healthy (expected 204)"),
            ]
            for cfg, ok, detail in cases:
                res = await run_check(cfg, BACKEND)
                assert (res.ok, res.detail) == (ok, detail), (cfg.url, res)
    run(main())


def test_up_to_three_redirects_are_followed(run: Run) -> None:
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/redirect/3"), BACKEND)
            assert res.ok and res.detail == f"HTTP 200 from {base}/redirect/0, healthy", res
            res = await run_check(http(f"{base}/redirect/4"), BACKEND)
            assert (res.ok, res.result) == (False, "failure"), res
            assert res.detail == f"more than 3 redirects from {base}/redirect/4"
    run(main())


def test_redirect_to_another_server(run: Run) -> None:
    async def main() -> None:
        async with webapp() as base, webapp() as other:
            to = f"{other}/healthcheck%3Fstate%3Ddegraded"
            res = await run_check(http(f"{base}/elsewhere?to={to}", degraded="drain"), BACKEND)
            assert (res.ok, res.drain) == (True, True), res
            assert res.detail.startswith(f"HTTP 200 from {other}/healthcheck?state=degraded")
            res = await run_check(http(f"{base}/elsewhere?to=ftp://127.0.0.1/x"), BACKEND)
            assert not res.ok
            assert res.detail == ("redirected to something that is not an http(s) URL: "
                                  "'ftp://127.0.0.1/x'")
    run(main())


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_huge_body_is_not_read(run: Run, content_type: str) -> None:
    """An endless body: the check reads 64 KiB, judges by the status code, and is done long
    before the timeout (reading on would end in the timeout)."""
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/huge?type={content_type}", timeout=2.0),
                                  BACKEND)
        assert res.ok and res.detail == "HTTP 200; body over 64 KiB, not read", res
        assert res.duration < 1.0
    run(main())


def test_password_never_in_a_detail(run: Run) -> None:
    async def main() -> None:
        with refusing_port() as ep:
            res = await run_check(http(f"http://admin:s3cret@{ep}/healthcheck"), BACKEND)
        assert not res.ok and "s3cret" not in res.detail, res
    run(main())


# ---------------------------------------------------------------------------------------
# down, garbage, timeouts


def test_refused(run: Run) -> None:
    async def main() -> None:
        with refusing_port() as ep:
            res = await run_check(http(f"http://{ep}/healthcheck"), BACKEND)
        assert (res.ok, res.result) == (False, "failure")
        assert res.detail == f"connect to {ep}: connection refused (nothing listening)"
    run(main())


@pytest.mark.parametrize("sent, detail", [
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not a valid HTTP response from {url}: 'bad status line'"),
    (b"", "{url} closed the connection before a complete response"),
])
def test_garbage_answer(run: Run, sent: bytes, detail: str) -> None:
    async def main() -> None:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(sent)
            writer.close()

        async with serve(handler) as srv:
            url = f"http://{srv.endpoint}/healthcheck"
            res = await run_check(http(url), BACKEND)
        assert (res.ok, res.result, res.detail) == (False, "failure", detail.format(url=url))
    run(main())


def test_bad_url_is_a_failure_not_an_exception(run: Run) -> None:
    async def main() -> None:
        for url, detail in [("ftp://example.org/", "not an http(s) URL: 'ftp://example.org/'"),
                            ("http://[::1/", "not a valid URL: 'http://[::1/'"),
                            ("", "http check without a url")]:
            res = await run_check(http(url), BACKEND)
            assert (res.ok, res.detail) == (False, detail), res
    run(main())


def test_slow_headers_time_out(run: Run) -> None:
    """A status line, then nothing: the timeout covers the whole exchange."""
    async def main() -> None:
        async with serve(answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/pl")) as srv:
            url = f"http://{srv.endpoint}/healthcheck"
            res = await run_check(http(url), BACKEND)
        assert (res.ok, res.result) == (False, "timeout"), res
        assert res.detail == f"timed out after {T:g}s waiting for the response from {url}"
        assert T - 0.01 <= res.duration < T + LATE
    run(main())


@pytest.mark.parametrize("delay, ok", [pytest.param(INSIDE, True, id="inside"),
                                       pytest.param(OUTSIDE, False, id="outside")])
def test_slow_answer_near_the_timeout(run: Run, delay: float, ok: bool) -> None:
    async def main() -> None:
        async with webapp() as base:
            res = await run_check(http(f"{base}/slow?delay={delay}"), BACKEND)
        assert res.ok is ok, res
        assert res.result == ("success" if ok else "timeout")
        assert res.duration < T + LATE
    run(main())


# ---------------------------------------------------------------------------------------
# https


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"),
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture
def fresh_tls_context() -> Iterator[None]:
    """The check builds its verifying context once per process; these tests change what
    it trusts (SSL_CERT_FILE), so they rebuild it before and after."""
    http_check.tls_context.cache_clear()
    yield
    http_check.tls_context.cache_clear()


def _server_tls(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


def test_https_certificate_is_verified(run: Run, certificate: tuple[Path, Path],
                                       fresh_tls_context: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with webapp(_server_tls(certificate)) as base:
            res = await run_check(http(f"{base}/healthcheck"), BACKEND)
        assert (res.ok, res.result) == (False, "failure"), res
        port = base.rsplit(":", 1)[1]
        assert res.detail == (f"TLS certificate of 127.0.0.1:{port} not accepted: "
                              "self-signed certificate")
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")  # trust nothing, not even the system
    run(main())


def test_https_with_a_trusted_certificate(run: Run, certificate: tuple[Path, Path],
                                          fresh_tls_context: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with webapp(_server_tls(certificate)) as base:
            res = await run_check(http(f"{base}/healthcheck?state=degraded",
                                       degraded="drain"), BACKEND)
        assert (res.ok, res.drain) == (True, True), res
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    run(main())
