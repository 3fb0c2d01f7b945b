"""systemd's notify protocol, so a service manager knows when the server is ready, that it is
still alive, and when it is stopping (`Type=notify`, `WatchdogSec=` in
packaging/systemd/appliance.service).

The watchdog pings come from a task on the event loop: a loop stuck for longer than
`WatchdogSec` stops them, and systemd restarts the process, as it does after a crash
(`Restart=on-failure`). Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, state: str) -> bool:
        """Send one state message ("READY=1", "STATUS=...", ...); False when not under systemd
        or when the message could not be sent (logged, never raised)."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("could not notify systemd (%s): %s", state.split("=", 1)[0], exc)
            return False
        return True

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1\nSTATUS=stopping")

    async def run_watchdog(self) -> None:
        """Ping at half the watchdog interval until cancelled; returns at once without one."""
        if not self.enabled or self.watchdog_seconds is None:
            return
        interval = self.watchdog_seconds / 2
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """systemd's watchdog interval for this process, if it asked for pings."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent shell, say)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None
