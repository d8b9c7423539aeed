"""uvicorn glue for `tdserve api` with several worker processes.

uvicorn binds the shared listening socket with protocol 0, and asyncio enables TCP_NODELAY only on sockets
whose protocol is IPPROTO_TCP (`asyncio.base_events._set_nodelay`), so with `--workers N` Nagle's algorithm
holds back the second write of every response (headers, then body) until the client's delayed ACK: ~40 ms
added to each request on Linux. A single-worker uvicorn binds through `loop.create_server` and is unaffected.
"""

from __future__ import annotations

import socket

import uvicorn


class NoDelayConfig(uvicorn.Config):
    """A uvicorn Config whose listening socket carries IPPROTO_TCP, so accepted connections get TCP_NODELAY."""

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return sock
        # Same descriptor, protocol stated: what accept() copies onto each connection.
        return socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
