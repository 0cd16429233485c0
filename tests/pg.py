"""A throw-away PostgreSQL server for tests: ``initdb`` + ``pg_ctl`` in a temp dir, on a loopback port.

Use the ``postgres_url`` fixture (registered in conftest.py): it yields ``postgresql://batchfit@127.0.0.1:PORT/DB``
for a fresh database per test, on a server started once per test session and stopped (immediate mode) after it.

- Binaries: ``$BATCHFIT_PG_BIN``, else ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/*/bin``, else
  ``PATH``. The tests are skipped (with the reason) when no ``initdb`` is found or psycopg2 is not installed.
- PostgreSQL refuses to run as root. As root, the server runs as an unprivileged account via ``runuser`` (or
  ``su``): ``$BATCHFIT_PG_USER``, else ``postgres`` (the Debian/Ubuntu package creates it), else ``nobody``; the
  data directory is created owned by that user. Clients connect over TCP with ``trust`` auth on 127.0.0.1 only.
- ``fsync=off`` and ``initdb --no-sync``: the data is disposable and the tests stay fast.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

PG_USER = "batchfit"  # the database superuser initdb creates (not an OS account)


def find_bindir() -> Path | None:
    env = os.environ.get("BATCHFIT_PG_BIN")
    if env:
        return Path(env) if (Path(env) / "initdb").exists() else None
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10).stdout.strip()
            if out and (Path(out) / "initdb").exists():
                return Path(out)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _run_as() -> str | None:
    """The OS account to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("BATCHFIT_PG_USER"), "postgres", "nobody"):
        if not name:
            continue
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged account (postgres, nobody) to run PostgreSQL as")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One server in a temp dir. ``start()`` / ``stop()``; ``create_database()`` returns a URL."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="batchfit-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0

    def _cmd(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
        if self.user is not None:
            runner = shutil.which("runuser")
            if runner:
                argv = [runner, "-u", self.user, "--", *argv]
            else:
                argv = ["su", self.user, "-s", "/bin/sh", "-c", shlex.join(argv)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]} {log}")
        return proc

    def start(self) -> None:
        if self.user is not None:  # the server's files must belong to the account it runs as
            pw = pwd.getpwnam(self.user)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._cmd([str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8",
                   "--no-sync", "--locale=C"])
        for attempt in range(3):  # the free port may be taken between asking and binding: retry on another
            self.port = _free_port()
            opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            try:
                self._cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts,
                           "-w", "-t", "60", "start"])
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                      timeout=60)
        # The data directory holds thousands of files (one template copy per test database): removing them took
        # 4-10 s at the end of the session on a loaded machine. A detached ``rm`` removes them after the session.
        try:
            subprocess.Popen(["rm", "-rf", "--", str(self.root)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg2

        name = f"t_{uuid.uuid4().hex[:12]}"
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError("no PostgreSQL initdb found (set BATCHFIT_PG_BIN or install postgresql)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
