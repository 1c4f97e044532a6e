"""A throw-away PostgreSQL server for the tests (and .ci/run): Debian's (or any) initdb/postgres binaries, a
data directory under /var/tmp, listening on 127.0.0.1 only, on a free port, stopped by its PID.

PostgreSQL refuses to run as root: as root, the server runs as an unprivileged user (`postgres`, else
`nobody`). Where that user may not open /dev/null (some machines keep it 0600), the server gets a /dev/null
of its own in a private mount namespace (`unshare -m`, a device node beside the data, `mount --bind`),
which leaves the machine's as it is.

    python tests/pgserver.py start    # prints RUNNER_TEST_PG_URL=... and RUNNER_TEST_PG_PID=..., for eval
    python tests/pgserver.py stop PID DIR
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def binaries() -> Path | None:
    """The folder of initdb and postgres, or None."""
    found = shutil.which("initdb")
    candidates = [Path(os.path.realpath(found)).parent] if found else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for d in candidates:
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


def _wrap(cmd: list[str], user: str | None, private_null: Path | None) -> list[str]:
    if user is None:
        return cmd
    as_user = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups", *cmd]
    if private_null is None:
        return as_user
    # exec keeps one process: the PID Popen sees is the server's.
    script = 'mount --bind "$0" /dev/null && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(private_null), *as_user]


def _null_usable(user: str | None) -> bool:
    if user is None:
        return True
    probe = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--init-groups",
                            "sh", "-c", ": > /dev/null"], capture_output=True)
    return probe.returncode == 0


def start(base: str = "/var/tmp", durable: bool = False) -> tuple[str, int, Path]:
    """Start a server; returns (URL of its `postgres` database, the server's PID, its folder). `durable`: the
    data files are synced as a production server's (commits still do not wait for the disk, as SQLite's
    synchronous=NORMAL): for benchmarks; the tests' server syncs nothing."""
    bindir = binaries()
    if bindir is None:
        raise RuntimeError("no initdb/postgres found (install Debian's postgresql)")
    user = _user()
    root = Path(tempfile.mkdtemp(prefix="runner-pg-", dir=base))
    private_null = None
    if user is not None:
        os.chown(root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
        if not _null_usable(user):
            private_null = root / "null"
            os.mknod(private_null, 0o666 | 0o020000, os.makedev(1, 3))
            os.chmod(private_null, 0o666)
    data = root / "data"
    init = subprocess.run(_wrap([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                                 "-E", "UTF8", "--no-sync", "--no-instructions"], user, private_null),
                          capture_output=True, text=True)
    if init.returncode != 0:
        raise RuntimeError(f"initdb failed: {init.stderr.strip()[-2000:]}")
    port = _free_port()
    log = open(root / "server.log", "ab")
    # Durability settings off: the data is thrown away; loopback only; the socket file in the server's folder.
    server = subprocess.Popen(_wrap([str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                                     "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
                                     *([] if durable else ["-c", "fsync=off", "-c", "full_page_writes=off"]),
                                     "-c", "synchronous_commit=off", "-c", "max_connections=300"], user, private_null),
                              stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"PostgreSQL stopped at start: {(root / 'server.log').read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    import psycopg  # accepting connections, not only listening

    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            break
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return url, server.pid, root


def stop(pid: int, root: Path | None = None) -> None:
    """Stop the server by its PID (SIGINT: a fast shutdown), then remove its folder."""
    import signal

    try:
        os.kill(pid, signal.SIGINT)
        for _ in range(200):
            os.kill(pid, 0)
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["start"]:
        url, pid, root = start()
        print(f"RUNNER_TEST_PG_URL={url}\nRUNNER_TEST_PG_PID={pid}\nRUNNER_TEST_PG_DIR={root}")
    elif sys.argv[1:2] == ["stop"]:
        stop(int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    else:
        sys.exit(__doc__)
