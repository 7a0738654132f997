"""A gateway's role in an HA pair (keepalived + conntrackd, config/ha/), as nfqfw is told it.

keepalived's notify script runs `nfqfw ha role master|backup|fault [--conntrackd CONF]` at each
change of the VRRP sync group's state (control request "ha"). nfqfw keeps the role for
`status` and the metrics, and acts on it (the service's `_ha_role_changed`):
- master: the flows conntrackd committed into the kernel's table with nfqfw's offload bit (an
  HA peer admitted them) become nfqfw's records at once (nfqfw.service.offload.take_over);
- backup, fault: nfqfw forgets its own records (its flow table and its offloaded records; the
  kernel's entries are left to conntrackd): the peer carries those connections on now, and
  records kept would be stale (TCP windows) when this gateway is master again.

The sync state is conntrackd's statistics (`conntrackd -C CONF -s`), read when asked (`status`)
with a timeout, on a gateway told a role; none when there is no conntrackd (no binary, no
configuration). A gateway never told a role shows no HA part at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONNTRACKD_CONF = "/etc/conntrackd/conntrackd.conf"
STATS_TIMEOUT = 2.0  # seconds `conntrackd -s` may take (it asks the running conntrackd)

_LABELLED = re.compile(r"([A-Za-z][A-Za-z ]*?):\s+(\d+)")  # "current active connections:   3"
_COUNTED = re.compile(r"(\d+)\s+([A-Za-z][A-Za-z ]*[A-Za-z])")  # "0 Malformed msgs"


@dataclass
class HaState:
    """The role last told (None: never) and since when (wall clock), and conntrackd's config."""

    role: str | None = None
    since: float | None = None
    conntrackd_conf: str | None = None
    read_stats: Callable[[str], dict[str, Any] | None] = field(default=lambda conf: conntrackd_stats(conf))

    def conntrackd(self) -> str | None:
        """The conntrackd configuration to ask: the one told, else the default if it exists."""
        if self.conntrackd_conf:
            return self.conntrackd_conf
        return DEFAULT_CONNTRACKD_CONF if os.path.exists(DEFAULT_CONNTRACKD_CONF) else None

    def status(self) -> dict[str, Any] | None:
        """The `ha` part of a status answer; None when no role was told."""
        if self.role is None:
            return None
        conf = self.conntrackd()
        return {"role": self.role, "since": self.since, "conntrackd": self.read_stats(conf) if conf else None}


def conntrackd_stats(conf: str, timeout: float = STATS_TIMEOUT) -> dict[str, Any] | None:
    """conntrackd's statistics ({"stats": {section: {label: n}}} or {"error": why}); None when
    conntrackd is not installed."""
    binary = shutil.which("conntrackd") or next(
        (p for p in ("/usr/sbin/conntrackd", "/sbin/conntrackd") if os.path.exists(p)), None
    )
    if binary is None:
        return None
    try:
        done = subprocess.run(
            [binary, "-C", conf, "-s"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"conntrackd -s did not answer within {timeout:g} s"}
    except OSError as err:
        return {"error": f"conntrackd -s: {err}"}
    if done.returncode != 0 or not done.stdout.strip():
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"error": f"conntrackd -s: {why}"}
    return {"stats": parse_stats(done.stdout)}


def parse_stats(text: str) -> dict[str, dict[str, int]]:
    """`conntrackd -s` output -> {section: {label: number}}. A section is a line ending in ':'
    ("cache internal", "UDP traffic (active device=sync0)"); its lines hold "label: N" pairs
    (a second pair on a line, "failed", is named after the first: "connections created failed")
    or "N label" pairs ("12 Bytes sent", "0 Lost msgs")."""
    sections: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.endswith(":") and not _LABELLED.search(stripped):
            current = sections.setdefault(stripped[:-1].strip(), {})
            continue
        if current is None:
            continue
        labelled = _LABELLED.findall(stripped)
        if labelled:
            first = labelled[0][0].strip()
            for n, (label, value) in enumerate(labelled):
                current[label.strip() if n == 0 else f"{first} {label.strip()}"] = int(value)
        else:
            for value, label in _COUNTED.findall(stripped):
                current[label.strip()] = int(value)
    return sections
