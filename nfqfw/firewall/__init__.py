"""nfqfw's kernel rules: the Firewall interface (backend.py) and its implementations.

Every caller that changes or reads nfqfw's kernel rules holds a `Firewall` from
`backend_named()`; no other package runs a rule tool.
"""

from __future__ import annotations

from nfqfw.firewall.backend import Firewall, QueueSpec, RulesError
from nfqfw.firewall.marks import DEFAULT_CONN_MARK, DEFAULT_MARK, Marks

BACKENDS = ("iptables",)
DEFAULT_BACKEND = "iptables"


def backend_named(name: str = DEFAULT_BACKEND) -> Firewall:
    """The backend called `name` (one of BACKENDS)."""
    if name == "iptables":
        from nfqfw.firewall.iptables import Iptables

        return Iptables()
    raise RulesError(f"unknown firewall backend {name!r}: expected one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "DEFAULT_CONN_MARK",
    "DEFAULT_MARK",
    "Firewall",
    "Marks",
    "QueueSpec",
    "RulesError",
    "backend_named",
]
