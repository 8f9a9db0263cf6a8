"""What the admin port tells apart about browsers (ops/admin.py): a form's POST, to be
answered with a redirect back to the status page, and a request a browser makes on behalf
of another site, which must not change the gate.

A browser on the forwarder's host, or behind an ssh tunnel (whose peer is loopback too), may
be visiting any site, and a page there can post a form to http://127.0.0.1:9125/drain.  The
browser says where such a request comes from: Sec-Fetch-Site (cross-site, same-site) and
Origin (another origin, or "null" from a file or a sandbox).  A page on a name that its DNS
points at 127.0.0.1 (rebinding) is same-origin for the browser, so a browser's request must
also name the admin port by an address or localhost.  Clients that are not browsers (curl,
scripts, Prometheus) send neither header: the loopback peer is their only check.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web

FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def quality(accept: str, *types: str) -> float:
    """The q an Accept header gives the first of `types` it names (0: none)."""
    best: dict[str, float] = {}
    for part in accept.split(","):
        mtype, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for prm in params:
            k, _, v = prm.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        best.setdefault(mtype.lower(), q)
    for t in types:
        if t in best:
            return best[t]
    return 0.0


def wants_page(request: web.Request) -> bool:
    """A browser's form POST, or a client that prefers HTML to JSON: answered with a
    redirect to the page.  A form's content type alone is not enough (`curl -d ''` sends
    one and expects the JSON answer it always got)."""
    browser = "Origin" in request.headers or "Sec-Fetch-Mode" in request.headers
    if browser and request.content_type in FORMS:
        return True
    accept = request.headers.get("Accept", "")
    html_q = quality(accept, "text/html")
    return html_q > 0 and html_q > quality(accept, "application/json", "application/*", "*/*")


def cross_site(request: web.Request) -> str | None:
    """Why a browser's request must not change the gate (None: it may)."""
    site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    if site is None and origin is None:
        return None  # not a browser (curl, scripts): the loopback peer is enough
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site}"
    host = request.host.lower()
    if origin is not None and origin.lower() != f"http://{host}":
        return f"Origin {origin} is not http://{host}"
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name != "localhost" and not name.endswith(".localhost"):
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return f"Host {host} is a name, not an address"
    return None
