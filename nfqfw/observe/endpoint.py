"""Where the Prometheus endpoint listens: `--metrics [ADDR:]PORT`, parsed and checked.

Loopback only unless the operator allows more (the page names rules and shows traffic).
No prometheus_client here, so `nfqfw run --help` and the argument parser stay light.
"""

from __future__ import annotations

import ipaddress

DEFAULT_PORT = 9469


class MetricsError(Exception):
    """The endpoint cannot be served; str() is a one-line message."""


def parse_address(text: str) -> tuple[str, int]:
    """`PORT`, `ADDR:PORT` or `[IPV6]:PORT` -> (host, port); a bare port is 127.0.0.1:PORT.
    ADDR is an IP address or `localhost`. Raises ValueError with the reason."""
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [IPV6]:PORT, got '{text}'")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"write an IPv6 address in brackets, as [{host}]:{port_text}")
    else:
        host, port_text = "127.0.0.1", text
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise ValueError(f"'{port_text}' is not a port number (1-65535)")
    if text.startswith("["):
        try:
            return str(ipaddress.IPv6Address(host)), int(port_text)
        except ValueError:
            raise ValueError(f"'{host}' is not an IPv6 address") from None
    if host == "localhost":
        return host, int(port_text)
    try:
        return str(ipaddress.IPv4Address(host)), int(port_text)
    except ValueError:
        raise ValueError(f"'{host}' is not an IPv4 address or localhost") from None


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def check_address(host: str, port: int, allow_remote: bool) -> None:
    if not allow_remote and not is_loopback(host):
        raise MetricsError(
            f"--metrics {show_address(host, port)}: not a loopback address; the metrics name the policy's "
            "rules and show its traffic: add --metrics-allow-remote to serve them beyond this host"
        )


def show_address(host: str, port: int) -> str:
    """HOST:PORT, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
