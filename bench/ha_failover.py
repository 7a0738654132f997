"""HA pair failover: how long traffic stops when the master dies, and how many sessions survive.

Builds the HA lab (nfqfw.lab.ha, prefix ``nfqb-ha-``, config/ha/policy.yaml), opens SESSIONS
TCP echo sessions from the inside host to the outside host (IPv4, masqueraded to the virtual
address) and exchanges data on each, waits until gw2's conntrackd holds them, then sends a UDP
datagram every INTERVAL ms from the inside host to the outside host and takes gw1's links down
(`nfqfw lab failover`). On the outside host's bridge the datagrams arrive by port gw1 or gw2:

    gap        last datagram through the old master to the first through the new one (s)
    takeover   the links going down to the new master holding the virtual addresses (s)
    lost       datagrams sent that never arrived
    survived   sessions that carry data again after the failover, of SESSIONS: half of them
               with the inside speaking first (as an echo client does), half with the outside
               first (offload: the replicated entry's mark lets it by on the new master)
    known      offloaded flows the new master's nfqfw lists once they carried data (taken over
               from the kernel's table, `nfqfw ha role master`)

Usage: bench/ha_failover.py [--sessions N] [--interval MS] [--rounds R]   (root)
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from nfqfw.control.client import call
from nfqfw.core.decode import decode
from nfqfw.core.packet import PROTO_UDP
from nfqfw.lab import daemon_ctl, ha, traffic
from nfqfw.lab.plan import HA_GATEWAYS, WAN_V4, HaTopology
from nfqfw.lab.topology import run_in

PREFIX = "nfqb-ha-"
POLICY = Path(__file__).resolve().parents[1] / "config" / "ha" / "policy.yaml"
ECHO_PORT, PROBE_PORT = 8080, 9999
ETH_P_ALL = 0x0003


class Arrivals:
    """Datagrams to PROBE_PORT arriving at the outside host, by bridge port: seq -> (time, port)."""

    def __init__(self, ns: str) -> None:
        self.socks = {}
        for gateway in HA_GATEWAYS:
            sock = traffic.socket_in(ns, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            sock.bind((gateway, ETH_P_ALL))
            self.socks[sock] = gateway
        self.seen: dict[int, tuple[float, str]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        poller, by_fd = select.poll(), {sock.fileno(): sock for sock in self.socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)  # not select(): a session's sockets pass fd 1024
        while not self.stop.is_set():
            ready = poller.poll(100)
            now = time.monotonic()
            for fd, _ in ready:
                sock = by_fd[fd]
                data, address = sock.recvfrom(65535)
                if address[1] != 0x0800 or address[2] == 4:  # IPv4, received (not sent) frames
                    continue
                pkt = decode(data)
                if pkt.proto == PROTO_UDP and pkt.dport == PROBE_PORT:
                    seq = struct.unpack_from("!I", data, 28)[0]
                    self.seen.setdefault(seq, (now, self.socks[sock]))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock in self.socks:
            sock.close()


def _sender(ns: str, interval: float, stop: threading.Event, sent: list[int]) -> None:
    with traffic.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        seq = 0
        while not stop.is_set():
            with contextlib.suppress(OSError):
                sock.sendto(struct.pack("!I", seq), (WAN_V4, PROBE_PORT))
            sent.append(seq)
            seq += 1
            time.sleep(interval)


def _sessions(t: HaTopology, count: int) -> tuple[socket.socket, list[tuple[socket.socket, socket.socket]]]:
    listener = traffic.socket_in(t.wan, socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((WAN_V4, ECHO_PORT))
    listener.listen(count)
    pairs = []
    for _ in range(count):
        client = traffic.socket_in(t.lan, socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect((WAN_V4, ECHO_PORT))
        server, _ = listener.accept()
        pairs.append((client, server))
    return listener, pairs


def _exchange(pairs: list[tuple[socket.socket, socket.socket]], data: bytes, timeout: float) -> int:
    """Send from every client, answer from every server; how many clients got their bytes back."""
    for client, _ in pairs:
        client.sendall(data)
    ok = 0
    deadline = time.monotonic() + timeout
    for client, server in pairs:
        for sock in (client, server):
            sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            server.sendall(server.recv(len(data)))
            ok += client.recv(len(data)) == data
        except OSError:
            continue
    return ok


def _exchange_outside_first(
    pairs: list[tuple[socket.socket, socket.socket]], data: bytes, timeout: float
) -> int:
    """Send from every server, answer from every client; how many servers got their bytes back."""
    return _exchange([(server, client) for client, server in pairs], data, timeout)


def _replicated(t: HaTopology, count: int) -> bool:
    files = ha.GatewayFiles(PREFIX, "gw2")
    dump = run_in(t.gw("gw2"), "conntrackd", "-C", str(files.conntrackd_conf), "-e", "ct")
    return dump.count(f"dport={ECHO_PORT} ") >= count


def one_round(sessions: int, interval: float) -> dict[str, float]:
    policy = Path(tempfile.mkdtemp()) / "policy.yaml"
    policy.write_text(POLICY.read_text())
    policy.chmod(0o600)
    try:
        t = ha.up(PREFIX, policy).topology
        listener, pairs = _sessions(t, sessions)
        assert _exchange(pairs, b"before", 10.0) == sessions
        deadline = time.monotonic() + 30
        while not _replicated(t, sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        arrivals, stop, sent = Arrivals(t.wan), threading.Event(), []
        sender = threading.Thread(target=_sender, args=(t.lan, interval, stop, sent), daemon=True)
        sender.start()
        time.sleep(1.0)
        start = time.monotonic()
        failed = ha.failover(PREFIX)
        new = ha.wait_master(PREFIX, ha.ELECTION_TIMEOUT, other_than=failed)
        takeover = time.monotonic() - start
        time.sleep(2.0)
        stop.set()
        sender.join()
        time.sleep(0.2)
        arrivals.close()
        via = sorted(arrivals.seen.values())
        last_old = max(when for when, port in via if port == failed)
        first_new = min(when for when, port in via if port == new)
        half = len(pairs) // 2
        survived = _exchange(pairs[:half], b"after!", 20.0)
        survived += _exchange_outside_first(pairs[half:], b"after!", 20.0)
        status = call(daemon_ctl.LabState(PREFIX, new).runtime_dir, {"cmd": "status"}, timeout=30)
        known = status["flows"].get("offloaded", {}).get("total", 0)
        for client, server in pairs:
            client.close()
            server.close()
        listener.close()
        return {
            "gap": first_new - last_old,
            "takeover": takeover,
            "lost": len(sent) - len(arrivals.seen),
            "survived": survived,
            "known": known,
        }
    finally:
        ha.down(PREFIX)
        policy.unlink()
        policy.parent.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200, help="TCP sessions (default 200)")
    parser.add_argument("--interval", type=float, default=5.0, help="ms between datagrams (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="failovers, each on a new lab (default 3)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two sockets a session
    print(f"{'round':>5} {'gap s':>7} {'takeover s':>10} {'lost':>6} {'survived':>12} {'known':>6}")
    for number in range(1, args.rounds + 1):
        r = one_round(args.sessions, args.interval / 1000)
        survived = f"{r['survived']:.0f}/{args.sessions}"
        figures = f"{r['gap']:>7.2f} {r['takeover']:>10.2f} {r['lost']:>6.0f}"
        print(f"{number:>5} {figures} {survived:>12} {r['known']:>6.0f}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
