"""The tests run against a real Agora node: AGORA_NATS_URL names its NATS (the Rust test
`python_sdk` starts one and runs pytest), AGORA_BIN the agora binary for `agora ctl`."""

import asyncio
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture
def url() -> str:
    value = os.environ.get("AGORA_NATS_URL")
    if not value:
        raise RuntimeError(
            "AGORA_NATS_URL is not set: run these tests through `cargo test --release --test system python_sdk` "
            "(it starts a node), or start `agora node` and set AGORA_NATS_URL to the URL it printed"
        )
    return value


class Proxy:
    """A TCP proxy in front of NATS: cut, it drops every connection and refuses new ones until
    restored (a network partition, nothing killed)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.listen_port = 0
        self._server = None
        self._links = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)

        async def pipe(src, dst):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    dst.write(data)
                    await dst.drain()
            except Exception:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links.discard(link)

    async def cut(self) -> None:
        self._server.close()
        for a, b in list(self._links):
            a.close()
            b.close()
        self._links.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.listen_port}"
