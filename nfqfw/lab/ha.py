"""The HA lab: two gateways sharing virtual addresses (keepalived, VRRP) and the kernel's connection
table (conntrackd), each running nfqfw, between an outside and an inside host.

::

    {P}wan  br0 203.0.113.10/24 2001:db8:1::10/64 (ports gw1, gw2)
    {P}gw1  wan0 .2 ::2, lan0 10.0.0.2 fd00::2, sync0 172.31.255.1/30
    {P}gw2  wan0 .3 ::3, lan0 10.0.0.3 fd00::3, sync0 172.31.255.2/30 (a veth to gw1's sync0)
    {P}lan  br0 10.0.0.25/24 fd00::25/64 (ports gw1, gw2)
    virtual addresses on the VRRP master: 203.0.113.1, 2001:db8:1::1 (wan0), 10.0.0.1, fd00::1 (lan0)

The networks are bridges inside the hosts' namespaces, so nothing is created in the root
namespace. Every gateway forwards, SNATs 10.0.0.0/24 to the virtual 203.0.113.1 (not
MASQUERADE: the mapping must be the same on both gateways) and runs, in this order, nfqfw (its
kernel rules must be in before VRRP adverts are to pass), conntrackd and keepalived, from the
configurations under config/ha/ of the checkout with their ``{{field}}`` placeholders filled in.
Each gateway's files are in ``/run/nfqfw-lab/{P}/{gw}/``: nfqfw's (as the single lab's daemon,
nfqfw.lab.daemon_ctl), keepalived.conf, conntrackd.conf, their logs and pid files, notify.log.

`failover` takes the master's links down (wan0, lan0, sync0), as a machine that dies; its
processes keep running, as on a machine whose cables were pulled, and `recover` brings the links
back: with nopreempt it rejoins as backup. `down` ends every process in the namespaces
(nfqfw by its pid first, so it stops the normal way) and removes them, whatever state they are in.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import NetNS, netns

from nfqfw.lab import daemon_ctl
from nfqfw.lab.plan import (
    GW_LAN_V4,
    GW_LAN_V6,
    GW_WAN_V4,
    GW_WAN_V6,
    HA_BRIDGE,
    HA_GATEWAYS,
    HA_LAN,
    HA_PRIORITY,
    HA_SYNC,
    HA_SYNC_IFACE,
    HA_SYNC_PREFIXLEN,
    HA_WAN,
    LAN_NET_V4,
    LAN_NET_V6,
    LAN_V4,
    LAN_V6,
    WAN_V4,
    WAN_V6,
    HaTopology,
    LabError,
)
from nfqfw.lab.topology import (
    Link,
    configure_link,
    existing_namespaces,
    in_ns,
    pids_in,
    prepare_namespace,
    run_in,
    sysctl,
    teardown,
    veth_pair,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config" / "ha"
NOTIFY_SCRIPT = "nfqfw-ha-notify"
IFF_UP = 0x1
GATEWAY_LINKS = ("wan0", "lan0", HA_SYNC_IFACE)
VIRTUAL = {"wan0": (GW_WAN_V4, GW_WAN_V6), "lan0": (GW_LAN_V4, GW_LAN_V6)}
ADVERT_INT = 1.0  # seconds, as in config/ha/keepalived.conf
# RFC 5798: a backup takes over after 3 adverts missed plus a skew of (256 - priority)/256 adverts.
MASTER_DOWN = {gw: 3 * ADVERT_INT + (256 - prio) / 256 * ADVERT_INT for gw, prio in HA_PRIORITY.items()}
ELECTION_TIMEOUT = 15.0  # the first election takes MASTER_DOWN; slow CI machines more
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class GatewayFiles:
    """Where an HA lab keeps one gateway's files (nfqfw's are daemon_ctl.LabState's)."""

    prefix: str
    gateway: str

    @property
    def directory(self) -> Path:
        return daemon_ctl.LabState(self.prefix, self.gateway).directory

    keepalived_conf = property(lambda self: self.directory / "keepalived.conf")
    keepalived_pid = property(lambda self: self.directory / "keepalived.pid")
    vrrp_pid = property(lambda self: self.directory / "keepalived-vrrp.pid")
    daemon_log = property(lambda self: daemon_ctl.LabState(self.prefix, self.gateway).log_file)
    keepalived_log = property(lambda self: self.directory / "keepalived.log")
    conntrackd_conf = property(lambda self: self.directory / "conntrackd.conf")
    conntrackd_log = property(lambda self: self.directory / "conntrackd.log")
    conntrackd_ctl = property(lambda self: self.directory / "conntrackd.ctl")  # its UNIX Path
    notify_log = property(lambda self: self.directory / "notify.log")  # roles, one a line


@dataclass(frozen=True)
class HaLab:
    topology: HaTopology
    daemons: dict[str, daemon_ctl.Daemon]  # by gateway; empty without a policy


@dataclass(frozen=True)
class GatewayStatus:
    gateway: str
    links_up: bool
    virtual: tuple[str, ...]  # the virtual addresses it holds

    @property
    def role(self) -> str:
        if not self.links_up:
            return "failed (links down)"
        if len(self.virtual) == 2 * len(VIRTUAL):
            return "master"
        return "backup" if not self.virtual else "split (holds some virtual addresses only)"


# Processes this process started, so that `down` can reap them.
_children: list[subprocess.Popen[bytes]] = []


# --- up and down --------------------------------------------------------------------------------


def up(
    prefix: str,
    policy: str | os.PathLike[str] | None,
    timeout: float = ELECTION_TIMEOUT,
    args: Sequence[str] = (),
) -> HaLab:
    """Build the HA lab and start nfqfw (with a policy), conntrackd and keepalived on both gateways;
    returns once one gateway holds the virtual addresses. Anything left of a lab with the same
    prefix is taken down first; on failure, what was built is taken down again."""
    topology = HaTopology(prefix)
    down(prefix)
    daemons = {}
    try:
        build(topology)
        for gateway in HA_GATEWAYS:
            files = GatewayFiles(prefix, gateway)
            files.directory.mkdir(parents=True, exist_ok=True)
            for log in (files.daemon_log, files.keepalived_log, files.conntrackd_log):
                daemon_ctl.start_fresh_log(log)  # this lab's only (the last one's as NAME.1)
            if policy is not None:
                daemons[gateway] = daemon_ctl.start_daemon(prefix, policy, args=args, gateway=gateway)
            _start_conntrackd(topology, files)
        for gateway in HA_GATEWAYS:
            _start_keepalived(topology, GatewayFiles(prefix, gateway))
        wait_master(prefix, timeout)
    except BaseException:
        down(prefix)
        raise
    return HaLab(topology, daemons)


def down(prefix: str) -> list[str]:
    """Stop nfqfw, end every other process in the namespaces, remove them and the lab's files;
    returns what was removed (empty if nothing). Idempotent."""
    removed = []
    for gateway in HA_GATEWAYS:
        if daemon_ctl.stop_daemon(prefix, gateway=gateway) is not None:
            removed.append(f"nfqfw daemon ({gateway})")
    removed += teardown(HaTopology(prefix))
    for child in list(_children):
        if child.poll() is not None:  # reaped (teardown ended it)
            _children.remove(child)
    for gateway in HA_GATEWAYS:
        files = GatewayFiles(prefix, gateway)
        # The notify log is this lab's record of roles: the next lab with the prefix starts a new
        # one (kept, a later lab's first election would read as flapping). The daemons' logs stay.
        for path in (files.keepalived_pid, files.vrrp_pid, files.conntrackd_ctl, files.notify_log):
            path.unlink(missing_ok=True)
        files.directory.joinpath("conntrackd.lock").unlink(missing_ok=True)
        state = daemon_ctl.LabState(prefix, gateway)
        for path in (state.pid_file, state.notify_socket, state.control_socket):
            path.unlink(missing_ok=True)
        shutil.rmtree(state.state_dir, ignore_errors=True)
    return removed


def build(topology: HaTopology) -> None:
    """The namespaces, bridges, links, addresses, routes, forwarding and SNAT (no daemons)."""
    leftovers = existing_namespaces(topology)
    if leftovers:
        raise LabError(f"namespaces already exist: {', '.join(leftovers)} (run `nfqfw lab down` first)")
    try:
        _build(topology)
    except Exception as err:
        teardown(topology)
        if isinstance(err, LabError):
            raise
        raise LabError(f"building the HA lab failed: {err}") from err


def _build(topology: HaTopology) -> None:
    for name in topology.namespaces:
        netns.create(name)
        prepare_namespace(name)
    wan = Link(topology.wan, HA_BRIDGE, f"{WAN_V4}/24", f"{WAN_V6}/64")
    lan = Link(topology.lan, HA_BRIDGE, f"{LAN_V4}/24", f"{LAN_V6}/64")
    for host in (wan, lan):
        _bridge(host.ns)
        configure_link(host)
    for gateway in HA_GATEWAYS:
        ns = topology.gw(gateway)
        (wan_v4, wan_v6), (lan_v4, lan_v6) = HA_WAN[gateway], HA_LAN[gateway]
        gw_wan, gw_lan = (
            Link(ns, "wan0", f"{wan_v4}/24", f"{wan_v6}/64"),
            Link(ns, "lan0", f"{lan_v4}/24", f"{lan_v6}/64"),
        )
        veth_pair(gw_wan, Link(topology.wan, gateway, "", ""))
        veth_pair(gw_lan, Link(topology.lan, gateway, "", ""))
        for link in (gw_wan, gw_lan):
            configure_link(link)
        for host in (topology.wan, topology.lan):
            _bridge_port(host, gateway)
    _sync_link(topology)
    with NetNS(topology.wan) as ipr:
        ipr.route("add", dst=LAN_NET_V4, gateway=GW_WAN_V4)
        ipr.route("add", dst=LAN_NET_V6, gateway=GW_WAN_V6, family=10)
    with NetNS(topology.lan) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=GW_LAN_V4)
        ipr.route("add", dst="::/0", gateway=GW_LAN_V6, family=10)
    for gateway in HA_GATEWAYS:
        ns = topology.gw(gateway)
        with NetNS(ns) as ipr:
            ipr.route("add", dst="0.0.0.0/0", gateway=WAN_V4)
            ipr.route("add", dst="::/0", gateway=WAN_V6, family=10)
        sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        run_in(ns, "iptables", "-w", "-t", "nat", "-A", "POSTROUTING",
               "-s", LAN_NET_V4, "-o", "wan0", "-j", "SNAT", "--to-source", GW_WAN_V4)  # fmt: skip


def _bridge(ns: str) -> None:
    """A bridge that forwards at once (no STP, no forward delay) and floods multicast (VRRP
    adverts, neighbour discovery) without snooping."""
    run_in(ns, "ip", "link", "add", HA_BRIDGE, "type", "bridge",
           "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")  # fmt: skip
    sysctl(ns, f"net.ipv6.conf.{HA_BRIDGE}.accept_dad=0")


def _bridge_port(ns: str, ifname: str) -> None:
    run_in(ns, "ip", "link", "set", ifname, "master", HA_BRIDGE, "up")


def _sync_link(topology: HaTopology) -> None:
    """A veth between the gateways, sync0 on both ends (made as sync0/sync1 in gw1, the peer
    renamed once in gw2, where the name is free)."""
    gw1, gw2 = (topology.gw(g) for g in HA_GATEWAYS)
    veth_pair(Link(gw1, HA_SYNC_IFACE, "", ""), Link(gw2, "sync1", "", ""))
    run_in(gw2, "ip", "link", "set", "sync1", "name", HA_SYNC_IFACE)
    for gateway, ns in zip(HA_GATEWAYS, (gw1, gw2), strict=True):
        run_in(ns, "ip", "addr", "add", f"{HA_SYNC[gateway]}/{HA_SYNC_PREFIXLEN}", "dev", HA_SYNC_IFACE)
        run_in(ns, "ip", "link", "set", HA_SYNC_IFACE, "up")


# --- the daemons --------------------------------------------------------------------------------


_FIELD = re.compile(r"\{\{\w+\}\}")


def render(template: str, fields: dict[str, str]) -> str:
    """Fill in a config/ha template's {{field}}s; LabError if one is left or unknown."""
    for name, value in fields.items():
        template = template.replace("{{" + name + "}}", value)
    left = _FIELD.search(template)
    if left:
        raise LabError(f"config/ha template field {left.group()} has no value")
    return template


def _template(name: str) -> str:
    path = CONFIG_DIR / name
    try:
        return path.read_text()
    except FileNotFoundError:
        raise LabError(f"no {path}: the HA lab runs from a checkout (config/ha/)") from None


def _start_conntrackd(topology: HaTopology, files: GatewayFiles) -> None:
    gateway = files.gateway
    fields = {
        "sync_iface": HA_SYNC_IFACE,
        "local_sync": HA_SYNC[gateway],
        "peer_sync": HA_SYNC[topology.peer(gateway)],
        "dir": str(files.directory),
    }
    files.conntrackd_conf.write_text(render(_template("conntrackd.conf"), fields))
    _spawn(topology.gw(gateway), ["conntrackd", "-C", str(files.conntrackd_conf)], files.conntrackd_log)
    _wait_for(
        files.conntrackd_ctl.exists,
        START_TIMEOUT,
        f"conntrackd in {topology.gw(gateway)}",
        files.conntrackd_log,
    )


def _start_keepalived(topology: HaTopology, files: GatewayFiles) -> None:
    gateway = files.gateway
    runtime_dir = daemon_ctl.LabState(files.prefix, gateway).runtime_dir
    notify = f"{CONFIG_DIR / NOTIFY_SCRIPT} --log {files.notify_log} --nfqfw {_nfqfw_command()} "
    notify += f"--runtime-dir {runtime_dir} {files.conntrackd_conf}"
    fields = {"router_id": gateway, "priority": str(HA_PRIORITY[gateway]), "notify": notify}
    files.keepalived_conf.write_text(render(_template("keepalived.conf"), fields))
    argv = ["keepalived", "-n", "-l", "-D", "-G", "-P", "-f", str(files.keepalived_conf)]
    argv += ["-p", str(files.keepalived_pid), "-r", str(files.vrrp_pid)]
    _spawn(topology.gw(gateway), argv, files.keepalived_log)
    _wait_for(
        files.vrrp_pid.exists, START_TIMEOUT, f"keepalived in {topology.gw(gateway)}", files.keepalived_log
    )


def _nfqfw_command() -> str:
    """This nfqfw's command (the venv's console script next to the running python)."""
    beside = Path(sys.executable).with_name("nfqfw")
    return str(beside) if beside.exists() else "nfqfw"


def _spawn(ns: str, argv: list[str], log_file: Path) -> None:
    with open(log_file, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        _children.append(
            subprocess.Popen(
                in_ns(ns, *argv), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        )


def _wait_for(ready: Callable[[], bool], timeout: float, what: str, log_file: Path) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise LabError(f"{what} not ready within {timeout:g} s\n{daemon_ctl.log_tail(log_file)}")
        time.sleep(0.05)


# --- status, failover, recover ------------------------------------------------------------------


def status(prefix: str) -> list[GatewayStatus]:
    """Each gateway's links and the virtual addresses it holds (LabError if there is no HA lab)."""
    topology = HaTopology(prefix)
    missing = set(topology.namespaces) - set(existing_namespaces(topology))
    if missing:
        raise LabError(f"no HA lab with prefix {prefix!r} (missing: {', '.join(sorted(missing))})")
    return [_gateway_status(topology, gateway) for gateway in HA_GATEWAYS]


def _gateway_status(topology: HaTopology, gateway: str) -> GatewayStatus:
    held, links_up = [], True
    with NetNS(topology.gw(gateway)) as ipr:
        for ifname in GATEWAY_LINKS:
            index = ipr.link_lookup(ifname=ifname)[0]
            link = ipr.get_links(index)[0]
            links_up = links_up and bool(link["flags"] & IFF_UP)
            have = {addr.get_attr("IFA_ADDRESS") for addr in ipr.get_addr(index=index)}
            held += [address for address in VIRTUAL.get(ifname, ()) if address in have]
    return GatewayStatus(gateway, links_up, tuple(held))


def master(prefix: str) -> str | None:
    """The gateway holding all virtual addresses, or None."""
    return next((s.gateway for s in status(prefix) if s.role == "master"), None)


def wait_master(prefix: str, timeout: float, other_than: str | None = None) -> str:
    """Wait until a gateway (not `other_than`) holds all virtual addresses; its name."""
    deadline = time.monotonic() + timeout
    while True:
        holder = master(prefix)
        if holder is not None and holder != other_than:
            return holder
        if time.monotonic() >= deadline:
            found = "; ".join(f"{s.gateway}: {s.role}" for s in status(prefix))
            raise LabError(f"no gateway became VRRP master within {timeout:g} s ({found})")
        time.sleep(0.05)


def failover(prefix: str) -> str:
    """Take the master's links down, as a machine that dies; returns the failed gateway."""
    holder = master(prefix)
    if holder is None:
        raise LabError("no gateway is master: nothing to fail")
    _set_links(HaTopology(prefix).gw(holder), "down")
    return holder


def recover(prefix: str) -> list[str]:
    """Bring the links of failed gateways back up (they rejoin as backups); returns them."""
    failed = [s.gateway for s in status(prefix) if not s.links_up]
    for gateway in failed:
        _set_links(HaTopology(prefix).gw(gateway), "up")
    return failed


def _set_links(ns: str, state: str) -> None:
    with NetNS(ns) as ipr:
        for ifname in GATEWAY_LINKS:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state=state)


def conntrackd_stats(prefix: str, gateway: str, *what: str) -> str:
    """`conntrackd -s` (statistics) of a gateway's conntrackd, e.g. what = ("cache",)."""
    files = GatewayFiles(prefix, gateway)
    return run_in(HaTopology(prefix).gw(gateway), "conntrackd", "-C", str(files.conntrackd_conf), "-s", *what)


def conntrackd_pid(prefix: str, gateway: str) -> int:
    """The pid of a gateway's conntrackd (LabError if none runs)."""
    for pid in pids_in(HaTopology(prefix).gw(gateway)):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "conntrackd":
                return pid
    raise LabError(f"no conntrackd runs in {HaTopology(prefix).gw(gateway)}")


def notify_log(prefix: str, gateway: str) -> list[str]:
    """The roles keepalived's notify script was called with on `gateway`, in order."""
    with contextlib.suppress(FileNotFoundError):
        return GatewayFiles(prefix, gateway).notify_log.read_text().split()
    return []
