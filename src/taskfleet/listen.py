"""Listening sockets bound before a process starts its app (server and relay).

Contract: ``bind_tcp`` returns a non-blocking TCP socket already listening (backlog
``SERVER_BACKLOG``), or raises ``OSError`` (port taken, no such address). Bound first,
the port accepts connections from the moment the process starts: peers that connect
while the app is still starting wait in the kernel's backlog instead of being refused
(a relay tickled by a server that is starting exchanges at once).
"""

from __future__ import annotations

import socket

from taskfleet.settings import SERVER_BACKLOG


def bind_tcp(host: str, port: int) -> socket.socket:
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.listen(SERVER_BACKLOG)
    sock.setblocking(False)
    return sock
