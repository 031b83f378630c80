"""A byte-level SMTP client for protocol tests (smuggling, pipelining...)."""

from __future__ import annotations

import re
import socket
import ssl

_REPLY_END = re.compile(rb"^(\d{3}) ", re.M)


class RawSMTP:
    def __init__(self, port: int, *, context: ssl.SSLContext | None = None, implicit: bool = False,
                 source: str | None = None, timeout: float = 20.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if implicit:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """The next (possibly multi-line) reply: (code, text of all lines)."""
        while True:
            for m in _REPLY_END.finditer(self.buf):
                end = self.buf.find(b"\r\n", m.start())
                if end >= 0:
                    raw, self.buf = self.buf[:end + 2], self.buf[end + 2:]
                    return int(m.group(1)), raw.decode("utf-8", "replace")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext) -> tuple[int, str]:
        code, text = self.cmd("STARTTLS")
        if code == 220:
            self.sock = context.wrap_socket(self.sock, server_hostname="localhost")
        return code, text

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except (ConnectionError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ready_session(stack, *, helo: str = "client.test", cert: str | None = None) -> RawSMTP:
    """Connected, greeted, STARTTLS done, EHLO sent."""
    s = RawSMTP(stack.smtp_port)
    code, _ = s.reply()
    assert code == 220
    assert s.cmd(f"EHLO {helo}")[0] == 250
    assert s.starttls(stack.client_context(cert))[0] == 220
    assert s.cmd(f"EHLO {helo}")[0] == 250
    return s
