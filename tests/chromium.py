"""Headless Chromium (Debian's `chromium`) for the status page tests and the README
screenshot: `dump_dom` and `screenshot` run the browser once per page, `Browser` drives one
over the DevTools protocol (a WebSocket, with aiohttp's client) to click a page's buttons.

Every run gets a fresh profile directory and the flags that keep the browser from calling
home (no component updates, sync, QUIC or background networking), so it loads only the
loopback URL it is given.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio")
TIMEOUT = 60.0


def binary() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
    return path


def _run(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="fwchrome-") as profile:
        return subprocess.run([binary(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, timeout=timeout, check=False)


def dump_dom(url: str) -> str:
    """The DOM once the page has loaded, serialised."""
    r = _run("--dump-dom", url)
    if r.returncode != 0 or not r.stdout:
        raise AssertionError(f"chromium --dump-dom {url} failed ({r.returncode}): "
                             f"{r.stderr.decode(errors='replace')[-2000:]}")
    return r.stdout.decode()


def screenshot(url: str, path: Path, width: int = 1200, height: int = 1600) -> Path:
    """A PNG of the page's first `width` x `height` pixels."""
    path.unlink(missing_ok=True)
    r = _run(f"--screenshot={path}", f"--window-size={width},{height}", url)
    if r.returncode != 0 or not path.exists():
        raise AssertionError(f"chromium --screenshot {url} failed ({r.returncode}): "
                             f"{r.stderr.decode(errors='replace')[-2000:]}")
    return path


class Page:
    """One tab, attached in flat mode: commands carry its session id."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        return await self.browser.send(method, params, self.session)

    async def eval(self, expression: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def loaded(self, timeout: float = 20.0) -> None:
        """Until the tab's main frame has navigated to a new document (after redirects)
        and that document has loaded."""
        navigated = False
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.events.get()
                if ev["method"] == "Page.frameNavigated":
                    frame = ev["params"]["frame"]
                    navigated = navigated or (not frame.get("parentId")
                                              and frame.get("url") != "about:blank")
                elif ev["method"] == "Page.loadEventFired" and navigated:
                    return

    async def goto(self, url: str) -> None:
        self.drop_events()
        await self.send("Page.navigate", url=url)
        await self.loaded()

    async def click(self, selector: str) -> None:
        """Click the element and wait for the navigation it starts to load."""
        self.drop_events()
        found = await self.eval(f"(function(){{var e=document.querySelector("
                                f"{json.dumps(selector)});if(!e)return false;e.click();"
                                "return true})()")
        assert found, f"no {selector} on the page"
        await self.loaded()

    async def html(self) -> str:
        return str(await self.eval("document.documentElement.outerHTML"))

    async def location(self) -> str:
        return str(await self.eval("location.href"))

    def drop_events(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()


class Browser:
    """A headless Chromium with its DevTools endpoint on a loopback port of its choosing."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.profile = tempfile.mkdtemp(prefix="fwchrome-")
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.pages: dict[str, Page] = {}
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.stderr: asyncio.Task[None] | None = None

    async def start(self) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            binary(), *FLAGS, f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        url = None
        async with asyncio.timeout(TIMEOUT):
            while url is None:  # Chromium says where it listens on stderr, once ready
                line = (await self.proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise AssertionError("chromium exited before its DevTools endpoint")
                if line.startswith("DevTools listening on "):
                    url = line.split(" on ", 1)[1].strip()
        self.stderr = asyncio.create_task(self._drain_stderr())
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(url, max_msg_size=0,
                                             timeout=aiohttp.ClientWSTimeout(ws_close=5))
        self.reader = asyncio.create_task(self._read())
        return self

    async def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while await self.proc.stderr.read(65536):
            pass

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            elif (page := self.pages.get(data.get("sessionId", ""))) is not None:
                page.events.put_nowait(data)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(AssertionError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None, timeout: float = 20.0) -> dict[str, Any]:
        assert self.ws is not None
        i = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[i] = fut
        msg: dict[str, Any] = {"id": i, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        async with asyncio.timeout(timeout):
            data = await fut
        if "error" in data:
            raise AssertionError(f"{method}: {data['error']}")
        return dict(data.get("result", {}))

    async def new_page(self, url: str) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        session = (await self.send("Target.attachToTarget",
                                   {"targetId": target, "flatten": True}))["sessionId"]
        page = self.pages[session] = Page(self, session)
        await page.send("Page.enable")
        await page.goto(url)
        return page

    async def close(self) -> None:
        for task in (self.reader, self.stderr):
            if task is not None:
                task.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await asyncio.wait_for(self.proc.wait(), 5)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    try:
        yield await b.start()
    finally:
        await b.close()
