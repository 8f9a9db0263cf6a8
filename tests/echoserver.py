"""An asyncio (uvloop) echo server in its own process, for load tests: thousands of
concurrent connections that a thread per connection cannot carry.  Echoes every byte,
answers the client's FIN with its own once everything is written back.

    python -m tests.echoserver PORT        (prints "ready" when listening)
"""

from __future__ import annotations

import asyncio
import resource
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # pause_writing stops reading until the client catches up

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()

    def eof_received(self) -> bool:
        self.t.write_eof()  # sent after the buffered echo
        return True


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(main(int(sys.argv[1])))
