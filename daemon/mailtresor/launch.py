"""The `mailtresor` command's first steps (daemon/bin/mailtresor runs
main()): `search` and `show` go to the running daemon's query socket when
it answers for the same configuration file (mailtresor/query.py, which
also describes the protocol).  This module imports only the interpreter's
own modules and runs without the site module (the launcher starts Python
with -IS), so that a search costs little more than the interpreter's
start.  Everything else, and `search`/`show` when no daemon answers, runs
in this process: the site module, then mailtresor.cli.
"""

import os
import sys

from . import CONFIG_ENV_VAR, CONFIG_PATH, RUNTIME_DIRECTORY

# The commands the daemon answers (they take a cli.Session).
SERVED = ("search", "show")
SOCKET_NAME = "query.sock"
MAGIC = b"MTQ1"
# The answer's frames: kind (1 byte), length (4 bytes, big-endian), data.
OUT, ERR, EXIT, DECLINE = b"o", b"e", b"x", b"d"
ANSWER_TIMEOUT = 300.0                              # seconds, for each read from the socket
# Set to anything but "": search and show run in this process.
NO_DAEMON_ENV_VAR = "MAILTRESOR_NO_DAEMON"


def runtime_directory(text):
    """[appliance] runtime_directory of a configuration file, read just well
    enough to find the query socket: a plain quoted string or the default;
    None when written any other way.  A guess is harmless: the daemon
    checks the configuration file before it answers."""
    section, found = "", None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("["):
            section = s.split("#", 1)[0].strip()
            continue
        if section != "[appliance]" or not s.startswith("runtime_directory"):
            continue
        key, eq, value = s.partition("=")
        if not eq or key.strip() != "runtime_directory":
            continue
        value = value.strip()
        quote = value[:1]
        end = value.find(quote, 1) if quote in ("'", '"') else -1
        if end < 0 or "\\" in value[:end] or value[end + 1:].strip()[:1] not in ("", "#") or found is not None:
            return None
        found = value[1:end]
    return found if found is not None else RUNTIME_DIRECTORY


def encode_request(config_path, argv):
    payload = b"\0".join(x.encode("utf-8", "surrogateescape") for x in [config_path, *argv])
    return MAGIC + len(payload).to_bytes(4, "big") + payload


def _read_exactly(sock, n):
    chunks = []
    while n:
        b = sock.recv(min(n, 1 << 20))
        if not b:
            raise EOFError
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def ask_daemon(config, argv):
    """The exit code of the daemon's answer; None when no daemon answers
    for this configuration file (the command then runs here)."""
    try:
        path = os.path.realpath(config or os.environ.get(CONFIG_ENV_VAR) or CONFIG_PATH)
        with open(path, encoding="utf-8") as f:
            directory = runtime_directory(f.read())
    except (OSError, UnicodeDecodeError):
        return None
    if directory is None:
        return None
    import _socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(ANSWER_TIMEOUT)         # a daemon that never answers: run it here
    try:
        try:
            sock.connect(os.path.join(directory, SOCKET_NAME))
            sock.sendall(encode_request(path, argv))
            head = _read_exactly(sock, 5)
        except (OSError, EOFError):
            return None                     # no daemon, or it went away before answering
        while True:
            data = _read_exactly(sock, int.from_bytes(head[1:5], "big"))
            kind = head[:1]
            if kind == DECLINE:
                return None                 # declined: not the daemon's configuration
            if kind == EXIT:
                return int(data)
            _write_all(1 if kind == OUT else 2, data)
            head = _read_exactly(sock, 5)
    except (OSError, EOFError) as e:
        if isinstance(e, BrokenPipeError):
            return 0                        # as the command does: a closed pipe ends it quietly
        _write_all(2, b"mailtresor: the daemon stopped answering half way\n")
        return 1
    finally:
        sock.close()


def main():
    argv = sys.argv[1:]
    config, i = None, 0
    while i < len(argv):                    # the options before the command
        if argv[i] == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i][len("--config="):], i + 1
        else:
            break
    rest = argv[i:]
    if rest and rest[0] in SERVED and not {"-h", "--help"} & set(rest[1:]) \
            and os.environ.get(NO_DAEMON_ENV_VAR, "") == "":
        try:
            code = ask_daemon(config, rest)
        except KeyboardInterrupt:
            return 130
        if code is not None:
            # All output went out through os.write(): nothing is buffered,
            # and the interpreter's orderly shutdown would cost as much as
            # the daemon's search.
            os._exit(code)
    import site
    site.main()                             # -S left it out: the installed packages
    from .cli import main as cli_main
    return cli_main(argv)
