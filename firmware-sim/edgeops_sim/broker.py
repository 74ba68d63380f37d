"""A Mosquitto of the simulator's own, on a free loopback port, that it can stop and restart.

Persistence is on (saved every second and on a clean stop), so a restart keeps the
sessions and their queued messages: a broker restart fault tests the devices' and the
subscribers' reconnects, not the broker's memory. The tests use the same class.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from edgeops_sim.errors import SimError

__all__ = ["Broker", "free_port", "mosquitto_binary"]


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux's /proc; elsewhere:
    whether ``pid`` still runs, which a mosquitto that lost the port to another process does not)."""
    owned: set[str] = set()
    try:
        tables = [Path(f"/proc/net/{t}").read_text().splitlines()[1:] for t in ("tcp", "tcp6")]
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                owned.add(os.readlink(fd))
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    for row in (r.split() for table in tables for r in table):
        # local address "0100007F:075B", state 0A = LISTEN, inode in column 9
        if len(row) > 9 and row[3] == "0A" and int(row[1].rpartition(":")[2], 16) == port and f"socket:[{row[9]}]" in owned:
            return True
    return False


def mosquitto_binary() -> str:
    """The mosquitto executable.

    Raises:
        SimError: mosquitto is not installed.
    """
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SimError("mosquitto is not installed (apt-get install mosquitto; scripts/setup.sh does it), or pass --broker URL")


def _more_files(pid: int) -> None:
    """As many open files for ``pid`` as the hard limit allows (one per connection).

    Set from outside with ``prlimit`` rather than in a ``preexec_fn``: a ``preexec_fn`` makes
    ``subprocess`` run Python's fork handlers, and a library that registered one (JAX, pulled
    in by the TFLite exporter) warns that forking a multithreaded process may deadlock.
    Mosquitto checks the limit at each accept, so raising it right after the start is enough.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(OSError, ValueError):  # not permitted here: the default limit still serves a test fleet
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    """One Mosquitto process; ``stop()``/``start()`` keep the port and (with persistence) the sessions."""

    def __init__(self, folder: Path, *, acl: str | None = None, persistence: bool = True) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {folder}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "log_dest stderr",
            "log_type error",
        ]
        if os.geteuid() == 0:  # started as root, mosquitto would drop to a user that cannot read our folders
            lines.append("user root")
        if acl is not None:
            (folder / "acl").write_text(acl)
            lines.append(f"acl_file {folder / 'acl'}")
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def from_config(cls, conf: Path, port: int, folder: Path, *, host: str = "127.0.0.1") -> Broker:
        """A broker that runs ``conf`` exactly as it is (e.g. ``edgeops fleet broker-config``'s output).

        ``conf`` must listen on ``host``:``port`` (readiness is a TCP connect there); the log
        goes to ``folder/log``. ``stop``/``start`` behave as for a broker of our own config.
        """
        broker = cls.__new__(cls)
        broker.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        broker.host, broker.port, broker.conf, broker.proc = host, port, conf, None
        return broker

    def reload(self) -> None:
        """Send SIGHUP: mosquitto re-reads its configuration (ACL, certificates, CRL) without a restart.

        Raises:
            SimError: the broker is not running.
        """
        if self.proc is None:
            raise SimError("the broker is not running")
        self.proc.send_signal(signal.SIGHUP)

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of this broker."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        """Start it and wait until it accepts connections.

        Raises:
            SimError: mosquitto is missing or did not listen within 10 s.
        """
        with open(self.folder / "log", "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=log)
        _more_files(self.proc.pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            # Another process may listen on the port (it was free when chosen, not reserved):
            # then ours exits on "Address already in use" and the connect reached a stranger.
            if _listens(self.proc.pid, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise SimError(f"mosquitto did not listen on {self.port}: {(self.folder / 'log').read_text()[-500:]}")

    def stop(self) -> None:
        """Stop it cleanly (it saves its persistence file)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None
