"""The lab's three network namespaces: an outside host, the gateway running nfqfw, an inside host.

::

      {P}wan (outside host)            {P}gw (gateway, nfqfw)             {P}lan (inside host)
    eth0 203.0.113.10/24  ------  wan0 203.0.113.1/24   lan0 10.0.0.1/24  ------  eth0 10.0.0.25/24
         2001:db8:1::10/64             2001:db8:1::1/64      fd00::1/64                fd00::25/64
                                       zone external         zone internal
                                       IPv4 masquerade of 10.0.0.0/24 out of wan0

Everything is built inside the namespaces: both veth pairs are created in the gateway's
namespace and one end of each is moved out, so the root namespace's interfaces, routes and
firewall are never touched. IPv6 duplicate address detection is off so that addresses work at
once. Building is all-or-nothing (a failure tears down what was built) and tearing down is
idempotent; it also ends processes still running inside the lab's namespaces, because a
namespace lives on as long as one process is in it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pyroute2 import NetNS, netns

from nfqfw.lab.plan import (
    DMZ_NET_V4,
    DMZ_NET_V6,
    DMZ_V4,
    DMZ_V6,
    GW_DMZ_V4,
    GW_DMZ_V6,
    GW_LAN_V4,
    GW_LAN_V6,
    GW_WAN_V4,
    GW_WAN_V6,
    LAN_NET_V4,
    LAN_NET_V6,
    LAN_V4,
    LAN_V6,
    NETNS_DIR,
    WAN_V4,
    WAN_V6,
    HaTopology,
    LabError,
    Topology,
)

IFA_F_NODAD = 0x02  # linux/if_addr.h: the address is usable at once, no DAD


@dataclass(frozen=True)
class Link:
    """One interface's configuration: where it lives and what it carries."""

    ns: str
    ifname: str
    v4: str
    v6: str


def existing_namespaces(topology: Topology | HaTopology) -> list[str]:
    return [name for name in topology.every_namespace if (NETNS_DIR / name).exists()]


def is_up(topology: Topology | HaTopology) -> bool:
    return all((NETNS_DIR / name).exists() for name in topology.namespaces)


def build(topology: Topology, nat: bool = True) -> None:
    """Create the namespaces, the links, addresses, routes, forwarding and (unless `nat` is False:
    a policy with its own `nat:` section, or the kernel oracle) the lab's own MASQUERADE.

    Raises LabError if any of the namespaces already exists or a step fails; in the latter case
    everything built so far is removed again.
    """
    leftovers = existing_namespaces(topology)
    if leftovers:
        raise LabError(f"namespaces already exist: {', '.join(leftovers)} (run `nfqfw lab down` first)")
    try:
        _build(topology, nat)
    except Exception as err:
        teardown(topology)
        if isinstance(err, LabError):
            raise
        raise LabError(f"building the lab failed: {err}") from err


def teardown(topology: Topology | HaTopology) -> list[str]:
    """End every process left inside the lab's namespaces and remove them; returns the removed names."""
    removed = []
    for name in existing_namespaces(topology):
        _kill_processes_in(name)
        netns.remove(name)
        removed.append(name)
    return removed


def _build(topology: Topology, nat: bool) -> None:
    for name in topology.namespaces:
        netns.create(name)
        prepare_namespace(name)
    wan = Link(topology.wan, "eth0", f"{WAN_V4}/24", f"{WAN_V6}/64")
    gw_wan = Link(topology.gw, "wan0", f"{GW_WAN_V4}/24", f"{GW_WAN_V6}/64")
    gw_lan = Link(topology.gw, "lan0", f"{GW_LAN_V4}/24", f"{GW_LAN_V6}/64")
    lan = Link(topology.lan, "eth0", f"{LAN_V4}/24", f"{LAN_V6}/64")
    veth_pair(gw_wan, wan)
    veth_pair(gw_lan, lan)
    for link in (wan, gw_wan, gw_lan, lan):
        configure_link(link)
    with NetNS(topology.wan) as ipr:
        ipr.route("add", dst=LAN_NET_V4, gateway=GW_WAN_V4)
        ipr.route("add", dst=LAN_NET_V6, gateway=GW_WAN_V6, family=10)
    with NetNS(topology.lan) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=GW_LAN_V4)
        ipr.route("add", dst="::/0", gateway=GW_LAN_V6, family=10)
    # The gateway's default routes point at the outside host, its uplink: the rest of the
    # Internet is out there (a packet from any outside source passes antispoof on wan0).
    with NetNS(topology.gw) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=WAN_V4)
        ipr.route("add", dst="::/0", gateway=WAN_V6, family=10)
    if topology.with_dmz:
        _build_dmz(topology)
    sysctl(topology.gw, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    if not nat:
        return
    run_in(topology.gw, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING",
           "-s", LAN_NET_V4, "-o", "wan0", "-j", "MASQUERADE")  # fmt: skip


def _build_dmz(topology: Topology) -> None:
    """The DMZ host behind the gateway's dmz0; the outside host routes to it through the gateway."""
    gw_dmz = Link(topology.gw, "dmz0", f"{GW_DMZ_V4}/24", f"{GW_DMZ_V6}/64")
    dmz = Link(topology.dmz, "eth0", f"{DMZ_V4}/24", f"{DMZ_V6}/64")
    veth_pair(gw_dmz, dmz)
    for link in (gw_dmz, dmz):
        configure_link(link)
    with NetNS(topology.dmz) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=GW_DMZ_V4)
        ipr.route("add", dst="::/0", gateway=GW_DMZ_V6, family=10)
    with NetNS(topology.wan) as ipr:
        ipr.route("add", dst=DMZ_NET_V4, gateway=GW_WAN_V4)
        ipr.route("add", dst=DMZ_NET_V6, gateway=GW_WAN_V6, family=10)


def prepare_namespace(name: str) -> None:
    with NetNS(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    # Interfaces created or moved in later inherit "default"; "all" covers the rest. The lab's
    # routes are static: no router solicitations, which would otherwise reach the gateway's
    # INPUT (and nfqfw's queue) at 4, 8, 16, 32 ... s after the lab comes up.
    sysctl(
        name,
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
        "net.ipv6.conf.all.router_solicitations=0",
        "net.ipv6.conf.default.router_solicitations=0",
    )


def veth_pair(local: Link, remote: Link) -> None:
    """Create the pair in `local`'s namespace (never in the root one) and move the peer out."""
    with NetNS(local.ns) as ipr:
        ipr.link("add", ifname=local.ifname, kind="veth", peer={"ifname": remote.ifname})
        peer = ipr.link_lookup(ifname=remote.ifname)[0]
        ipr.link("set", index=peer, net_ns_fd=remote.ns)


def configure_link(link: Link) -> None:
    sysctl(link.ns, f"net.ipv6.conf.{link.ifname}.accept_dad=0")
    with NetNS(link.ns) as ipr:
        index = ipr.link_lookup(ifname=link.ifname)[0]
        v4, v4_len = link.v4.split("/")
        v6, v6_len = link.v6.split("/")
        ipr.addr("add", index=index, address=v4, prefixlen=int(v4_len))
        ipr.addr("add", index=index, address=v6, prefixlen=int(v6_len), flags=IFA_F_NODAD)
        ipr.link("set", index=index, state="up")


def add_outside_addresses(topology: Topology, addresses: Sequence[str]) -> None:
    """More IPv4 addresses for the outside host, in its link's /24 (the gateway reaches them
    on the link, without a route)."""
    for address in addresses:
        run_in(topology.wan, "ip", "addr", "add", f"{address}/24", "dev", "eth0")


# --- commands inside a namespace ----------------------------------------------------------------


def in_ns(name: str, *argv: str) -> list[str]:
    """The argv running `argv` inside namespace `name`."""
    return ["ip", "netns", "exec", name, *argv]


def run_in(name: str, *argv: str, timeout: float = 30.0) -> str:
    """Run a command inside a namespace; its stdout, or LabError with its stderr."""
    try:
        done = subprocess.run(in_ns(name, *argv), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise LabError(f"in {name}: `{' '.join(argv)}` did not finish within {timeout:g} s") from err
    if done.returncode != 0:
        command = " ".join(argv)
        raise LabError(f"in {name}: `{command}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def sysctl(name: str, *assignments: str) -> None:
    run_in(name, "sysctl", "-q", "-w", *assignments)


def set_mtu(name: str, ifname: str, mtu: int) -> None:
    with NetNS(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)


# --- processes inside a namespace ---------------------------------------------------------------


def pids_in(name: str) -> list[int]:
    """Processes whose network namespace is `name` (what `ip netns pids` prints)."""
    try:
        target = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return []
    found = []
    for pid in _all_pids():
        try:
            ns = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            continue  # gone, or a kernel thread
        if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
            found.append(pid)
    return found


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def _kill_processes_in(name: str, grace: float = 3.0) -> None:
    """SIGTERM what runs in the namespace, SIGKILL what is still there after `grace` seconds."""
    pids = [pid for pid in pids_in(name) if pid != os.getpid()]
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.05)
    _signal_all([pid for pid in pids if process_alive(pid)], signal.SIGKILL)


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def process_alive(pid: int) -> bool:
    """True while `pid` runs. An exited process not yet reaped by its parent (a zombie) counts as
    gone; it is not reaped here, so a parent holding a Popen still gets its exit status."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")
