"""The systemd notify protocol (sd_notify(3)), client side.

systemd (or anything else, like the lab) passes the path of an AF_UNIX datagram socket in
$NOTIFY_SOCKET; the service sends newline-separated ``KEY=value`` assignments to it:

- ``READY=1``     start-up finished (for nfqfw: the queue is bound and the rules are in),
- ``RELOADING=1`` a reload began (followed by ``READY=1`` when done),
- ``STOPPING=1``  the service is shutting down,
- ``STATUS=...``  one line of free text shown by ``systemctl status``,
- ``WATCHDOG=1``  keep-alive, expected every $WATCHDOG_USEC microseconds when set.

The manager ignores names it does not know: a worker of `nfqfw run --workers` adds its counts
for its supervisor, the manager of its notify socket (nfqfw.service.supervision.COUNTS_FIELD).

A path starting with ``@`` names a socket in the abstract namespace (the ``@`` stands for a
leading NUL byte). Without $NOTIFY_SOCKET every call is a no-op, so the daemon can call it
unconditionally.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends notifications to $NOTIFY_SOCKET; silently does nothing when it is not set."""

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        self.address: str | None = None
        self._sock: socket.socket | None = None
        if address:
            # A leading '@' means the abstract namespace: the kernel wants a NUL byte there.
            self.address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` assignments in one datagram; True when sent."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError:
            return False  # the manager went away: notifications are advisory, never fatal
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *self._status(status))

    def reloading(self, status: str | None = None) -> bool:
        return self.notify("RELOADING=1", *self._status(status))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *self._status(status))

    def status(self, text: str, *more: str) -> bool:
        """STATUS=text, and `more` assignments in the same datagram."""
        return self.notify(*self._status(text), *more)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        # STATUS is a single line: newlines would start a new (bogus) assignment.
        return () if text is None else ("STATUS=" + text.replace("\n", " "),)


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as systemd advises), or None.

    $WATCHDOG_PID, when set, must be our pid: otherwise the watchdog is meant for another process.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
