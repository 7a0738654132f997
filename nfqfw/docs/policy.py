"""nfqfw-policy(5): the whole policy grammar, one entry per key of nfqfw.core.config.

KEYS maps each section (top, zones, zone, defaults, rule, set, nat, masquerade, snat, forward,
options) to its keys' documentation; the unit tests require the keys documented to be exactly
config's TOP_KEYS, ZONES, ZONE_KEYS, DEFAULT_KEYS, RULE_KEYS, SET_KEYS, NAT_KEYS,
MASQUERADE_KEYS, SNAT_KEYS, FORWARD_KEYS and OPTION_KEYS, and each choice the validator accepts
to be named, so a key added to the validator without a line here fails the tests.
"""

from __future__ import annotations

from nfqfw import __version__
from nfqfw.core.config import (
    DEFAULT_LIMIT_BURST,
    DEFAULT_LOG_LIMIT,
    DEFAULT_MAX_FLOWS,
    ICMP_TYPES,
    LOG_FORMATS,
    MAX_SET_FILE_ERRORS,
    PROTOCOLS,
    SERVICES,
    SET_NAME_RULE,
)
from nfqfw.docs import roff

Entry = tuple[str, str]  # (value syntax, what it means)

_LOG_COUNT, _LOG_PERIOD, _LOG_BURST = DEFAULT_LOG_LIMIT
_PERIOD_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}

KEYS: dict[str, dict[str, Entry]] = {
    "top": {
        "zones": ("mapping (required)", "Which interfaces face the outside and which the inside."),
        "defaults": ("mapping", "What happens to a new flow no rule matched, and to INVALID packets."),
        "ingress": (
            "list of rules",
            "Rules for flows started from the outside: arriving on an external interface, or on an "
            "interface in no zone, to the gateway itself or to a host behind it. Replies to flows "
            "started inside are not ingress: they are ESTABLISHED.",
        ),
        "egress": (
            "list of rules",
            "Rules for flows started inside: from an inside zone (to the outside, to the gateway, "
            "within the zone), or by the gateway itself.",
        ),
        "between": (
            "list of rules",
            "Rules for flows from one inside zone to another (lan to dmz, vpn to lan).",
        ),
        "nat": (
            "mapping",
            "The gateway's address translation: masquerade, snat, forward. nfqfw decides at the "
            "forward hook, after the port forwards' destination NAT and before source NAT: rules name "
            "the inside addresses.",
        ),
        "options": ("mapping", "Everything else; every option has a default."),
        "sets": (
            "mapping of set names",
            "Named sets of addresses and networks, used as @NAME wherever an address list goes (a "
            "rule's from and to, a nat entry's from), mixed with literal addresses; a set may hold "
            "IPv4 and IPv6. A set is a list (inline), a mapping with file, networks and comment (see "
            "SETS), or {} (filled at run time only, by nfqfw set add). Set names: " + SET_NAME_RULE + ".",
        ),
        "include": (
            "path or glob, or a list",
            "More policy files, relative to the including file; a glob (conf.d/*.yaml) is read in "
            "file-name order, and may match nothing. An included file holds sets, ingress, egress, "
            "between, nat and include: its rules and its masquerade, snat and forward entries are "
            "appended to the lists in that order (after the main file's), its sets merged; a rule, "
            "forward or set name defined twice is an error naming both places. Reload re-reads them "
            "all, and the policy sha256 covers them all.",
        ),
    },
    "zones": {
        "external": (
            "list of interface names, or a zone mapping (required, unless another zone faces the outside)",
            "Interfaces that face the outside (wan0, ppp0, ...). An interface name ending in + "
            "matches every name with that prefix (ppp+).",
        ),
        "internal": ("list of interface names, or a zone mapping", "Interfaces of the private side."),
    },
    "zone": {
        "faces": (
            "outside | inside (required but for external and internal)",
            "Any other zone (dmz, guest, vpn: NAME: {faces: inside, interfaces: [dmz0]}) says which "
            "side it faces. Flows from an outside zone are ingress; from an inside zone egress, or "
            "between when they go to another inside zone.",
        ),
        "interfaces": ("list of interface names (required but for external and internal)", "As above."),
        "networks": (
            "list of networks",
            "The addresses reached through the zone: a forward's target must be in one of them, and "
            "explain and replay route by them (the to-zone of a packet without --out).",
        ),
    },
    "defaults": {
        "ingress": ("accept | drop | reject", "For an ingress flow no rule matched (default drop)."),
        "egress": ("accept | drop | reject", "For an egress flow no rule matched (default accept)."),
        "between": (
            "accept | drop | reject",
            "For a flow between two inside zones no rule matched (default drop).",
        ),
        "invalid": (
            "accept | drop",
            "For packets conntrack calls INVALID: out of window, bad flags, a TCP segment of no known "
            "connection, malformed (default drop; accept only for debugging).",
        ),
    },
    "rule": {
        "name": ("text (required)", "Unique over both sides; shown in logs, counters, status and metrics."),
        "action": (
            "accept | drop | reject (required)",
            "reject answers TCP with a reset, UDP with ICMP port unreachable, other protocols with "
            "ICMP administratively prohibited, and never answers an ICMP error.",
        ),
        "proto": (
            "name, number 0-255, a list, or any",
            "The IP protocol. icmp means ICMP for IPv4 and ICMPv6 for IPv6, so one rule covers ping "
            "on both; icmpv6 (or ipv6-icmp) is ICMPv6 only. Names: " + ", ".join(PROTOCOLS) + ".",
        ),
        "family": ("ipv4 | ipv6", "Only packets of this IP version."),
        "from": (
            "address, network, a list, gateway, or any",
            "Source addresses; IPv4 and IPv6 may be mixed. gateway is the gateway itself, allowed in "
            "from of egress rules.",
        ),
        "to": (
            "address, network, a list, gateway, or any",
            "Destination addresses. gateway (in to of ingress rules) is the gateway itself rather "
            "than a host behind it.",
        ),
        "ports": (
            'port, service name, "first-last", or a list',
            "Destination ports; needs proto tcp or udp (the only protocols with ports). Service "
            "names are IANA's, from a table built into nfqfw (not /etc/services, so a policy means "
            "the same on every machine): "
            + ", ".join(f"{name} ({port})" for name, port in SERVICES.items())
            + ".",
        ),
        "sports": ('port, service name, "first-last", or a list', "Source ports, as ports."),
        "icmp-types": (
            "name, number, or a list",
            "ICMP or ICMPv6 types. A name that exists in both families matches both (echo-request is "
            "ICMPv4 type 8 and ICMPv6 type 128); numbers differ between the families, so they need "
            "proto icmpv6 or a family. Names: " + ", ".join(ICMP_TYPES) + ".",
        ),
        "in": (
            "interface name or a list",
            "The interface the packet arrives on (ppp+ matches ppp0, ppp1, ...).",
        ),
        "out": ("interface name or a list", "The interface the packet leaves by."),
        "from-zone": (
            "zone name or a list",
            "The zone the packet arrives from (ingress: zones facing the outside; egress and between: "
            "inside zones).",
        ),
        "to-zone": (
            "zone name or a list",
            "The zone the packet leaves to (between: inside zones). The gateway itself is in no zone.",
        ),
        "log": (
            "true | false",
            "Log the packets this rule decides about: the first packet of each flow it accepts, "
            "every packet it drops or rejects, within options log-limit.",
        ),
        "limit": (
            "N/second | N/minute | N/hour | N/day",
            "A token bucket, as iptables -m limit: once it is used up the rule does not match and "
            "the next rules are tried.",
        ),
        "limit-burst": (
            "positive number",
            f"Tokens the bucket holds (default {DEFAULT_LIMIT_BURST}); only with limit.",
        ),
        "limit-per": (
            "rule | source",
            "One bucket for the rule (the default) or one per source address; only with limit.",
        ),
        "comment": (
            "text",
            "What the rule is for; shown by explain and status (logs and counters keep the name).",
        ),
        "synproxy": (
            "true | false",
            "On an ingress rule with proto tcp and action accept: let the kernel's SYNPROXY answer "
            "SYNs with cookies, so a spoofed SYN flood creates no state (pf's synproxy state); only "
            "a handshake the client completed reaches nfqfw (which judges it by the whole policy, as "
            "coming in on each interface the rule covers) and the server. For servers behind the "
            "gateway only: SYNs to the gateway's own addresses are not proxied (capped by new-rate). "
            "Sets net.netfilter.nf_conntrack_tcp_loose=0. See the README's SYN proxy paragraph.",
        ),
    },
    "set": {
        "file": (
            "path",
            "A file of one address or network per line; everything after # or ; is a comment (the "
            "Spamhaus DROP and FireHOL formats). Relative to the policy file. Read with the policy "
            "(check reports its bad lines as FILE:LINE: message, at most "
            f"{MAX_SET_FILE_ERRORS}), again at each reload, and with options watch-sets when it "
            "changes.",
        ),
        "networks": ("address, network or a list", "Networks written in the policy, besides the file's."),
        "comment": ("text", "What the set is for; shown by status and nfqfw set list."),
    },
    "nat": {
        "masquerade": (
            "list of {out, from, family}",
            "Source NAT to the address of the interface a connection leaves by, as iptables MASQUERADE.",
        ),
        "snat": ("list of {out, from, to}", "Source NAT to a fixed address, as iptables SNAT."),
        "forward": (
            "list of forwards",
            "Port forwards (destination NAT) of published services, as firewalld's forward-port and "
            "pf's rdr pass.",
        ),
    },
    "masquerade": {
        "out": ("interface name or a list (required)", "The interfaces the translated connections leave by."),
        "from": (
            "network, @set or a list of them, or any",
            "Only connections from these sources (the inside addresses, before translation). A set "
            "(@NAME) is matched in the kernel by its ipset (nfqfw4-NAME, nfqfw6-NAME), its runtime "
            "entries (nfqfw set add) included at once; the entry takes the set's members of its "
            "own family. On a kernel without ipsets the daemon refuses a policy with sets in nat.",
        ),
        "family": (
            "ipv4 | ipv6",
            "Without from, IPv4 (the default) or IPv6; with from, the families of its networks "
            "(a from of sets alone: IPv4). "
            "IPv6 needs the kernel's IPv6 NAT (Linux 3.7 or later with ip6table_nat, or nf_tables "
            "nat): check and the daemon refuse it on a kernel without.",
        ),
    },
    "snat": {
        "out": ("interface name or a list (required)", "As masquerade."),
        "from": ("network, @set or a list of them, or any", "As masquerade."),
        "to": ("address (required)", "The source address the connections get; its family is the entry's."),
    },
    "forward": {
        "name": ("text (required)", "Unique over rules and forwards; counted and logged as forward NAME."),
        "proto": ("tcp | udp, or a list (required)", "The protocols forwarded."),
        "in": (
            "interface name or a list",
            "Where the connections arrive (default: the interfaces of the zones facing the outside).",
        ),
        "ports": ('port, "first-last", or a list (required)', "The public ports."),
        "to": (
            "address (required)",
            "The inside host; it must be in the networks of a zone. Its family is the forward's.",
        ),
        "to-port": (
            "port",
            "Another port on the inside host (then ports must be a single port); default the same.",
        ),
        "from": (
            "network, @set or a list of them, or any",
            "Only connections from these sources are forwarded; a set (@NAME) as in masquerade "
            "(its members of the forward's family, its runtime entries included).",
        ),
        "address": (
            "address",
            "Only connections to this public address (default: any of the gateway's addresses on "
            "the in interface).",
        ),
        "pass": (
            "true | false",
            "true (the default): the forward admits the connections it translates, counted and logged "
            "under its name, before any rule (a drop rule on a set does not see them); false: it "
            "only translates, and the rules decide on the translated packet (ingress rules naming "
            "the inside address).",
        ),
        "log": ("true | false", "Log the first packet of each connection the forward admits."),
        "hairpin": (
            "true | false",
            "true (the default): inside hosts that connect to the public address and port reach the "
            "inside host too, their source translated to the gateway's so that the replies come back "
            "through it.",
        ),
        "comment": ("text", "What the forward is for; shown by explain and status."),
    },
    "options": {
        "max-flows": (
            "positive number",
            f"Flows tracked at most (default {DEFAULT_MAX_FLOWS}, as nf_conntrack_max). When the "
            "table is full, flows not yet ASSURED are evicted first, as the kernel's early drop.",
        ),
        "tcp-pickup": (
            "strict | loose",
            "strict (the default): a TCP flow starts with a SYN; loose: also take over connections "
            "seen mid-stream.",
        ),
        "failure-mode": (
            "closed | open",
            "While nfqfw is not running: closed (the default) the kernel drops what nfqfw's rules "
            "queue; open lets it pass unfiltered (--queue-bypass).",
        ),
        "reload": (
            "recheck | keep",
            "On reload, recheck (the default) checks every tracked flow against the new rules and "
            "cuts those it would not admit; keep keeps established flows.",
        ),
        "log-denied": (
            "true | false",
            "Log every packet nfqfw drops or rejects (by a rule, a default, as INVALID, table full), "
            "as ufw does (default true); false: only rules with log: true.",
        ),
        "log-limit": (
            "N/second | N/minute | N/hour | N/day",
            f"Packet log lines per bucket (default {_LOG_COUNT}/{_PERIOD_NAMES[_LOG_PERIOD]}): one "
            "bucket per rule, per default and one for INVALID. Lines over it are counted and "
            "summarised as 'N packet log lines suppressed' at most once a minute.",
        ),
        "log-limit-burst": ("positive number", f"Lines a bucket holds (default {_LOG_BURST})."),
        "log-format": (
            " | ".join(LOG_FORMATS),
            "text (the default): the ufw-like packet line and plain messages; json: one JSON object "
            "per line, with Suricata eve.json's names (event_type flow_verdict for a packet, with "
            "timestamp, src_ip, src_port, dest_ip, dest_port, proto, in_iface, out_iface, hook, "
            "ct_state, action, reason, rule, flow_id; event_type daemon for nfqfw's own messages). "
            "Under systemd the journal gets the NFQFW_* fields either way. Applies from the moment "
            "a valid policy is loaded (start, reload).",
        ),
        "prefilter": (
            "on | off",
            "on (the default): the first packets no rule can accept (TCP SYNs and ICMP echo "
            "requests from outside to what only drop or reject rules or the ingress default cover) "
            "are dropped or rejected in the kernel, before the queue, with the same answer nfqfw "
            "would give; TCP flag combinations nfqfw always calls invalid are dropped there too.",
        ),
        "new-rate": (
            "N/second | N/minute | N/hour | N/day | off",
            "Packets that may start a flow (conntrack NEW) allowed to the queue, all sources "
            "together (default 5000/second); the rest are dropped in the kernel, so a flood of "
            "first packets cannot starve established flows.",
        ),
        "new-rate-per-source": (
            "N/second | N/minute | N/hour | N/day | off",
            "The same per source address (IPv6: per /64) and protocol (default 2500/second).",
        ),
        "offload": (
            "off | established",
            "off (the default); established: flows nfqfw has validated (a TCP handshake, a UDP "
            "reply) are handed to the kernel's conntrack, and their packets skip the queue. nfqfw "
            "still lists them (flows, status), takes them back (flush, reload: recheck) and panic "
            "mode drops them; they go on while nfqfw is stopped or restarting.",
        ),
        "antispoof": (
            "strict | loose | off",
            "Drop packets with a forged source address, in the kernel (its reverse-path lookup, "
            "iptables' rpfilter) before anything else: strict (the default) drops a packet whose "
            "source the gateway would not route back out of the interface it came in by, loose "
            "one whose source it would not route at all; the gateway's own addresses arriving from "
            "outside are dropped either way. Counted and logged as INVALID, reason 'spoofed source'. "
            "loose for asymmetric routing (a multi-homed gateway whose replies may leave by another "
            "uplink); off only where even that fails (check warns when an external zone has none).",
        ),
        "watch-sets": (
            "true | false",
            "true: a set file that changes on disk is read again at once (checked as at reload; a "
            "broken file keeps the set's old contents and is reported by status); false (the "
            "default): set files are read at start and reload only.",
        ),
        "gateway-addresses": (
            "list of addresses",
            "The gateway's own addresses, for the offline tools explain and replay (which then tell "
            "INPUT and OUTPUT from FORWARD); the running daemon learns them from the kernel.",
        ),
    },
}

HEADINGS = {
    "top": "THE FILE",
    "zones": "ZONES",
    "zone": "A ZONE WRITTEN AS A MAPPING",
    "defaults": "DEFAULTS",
    "rule": "RULES",
    "set": "SETS",
    "nat": "NAT",
    "masquerade": "NAT: MASQUERADE",
    "snat": "NAT: SNAT",
    "forward": "NAT: FORWARD",
    "options": "OPTIONS",
}

DESCRIPTION = (
    "The policy of nfqfw(8) is a YAML file, usually /etc/nfqfw/policy.yaml, owned by root and not "
    "writable by group or others (nfqfw refuses it otherwise). nfqfw is stateful: once the first "
    "packet of a flow is accepted, the packets of both directions, and the ICMP errors about the "
    "flow, pass as ESTABLISHED or RELATED without looking at the rules again. The rules decide "
    "about the first packet of a flow only. Every problem in the file is reported at once, as "
    "FILE:LINE:COL: message; check a file with nfqfw check FILE before (re)loading it."
)

RULES_INTRO = (
    "Each rule is a mapping; only name and action are required, and a key left out matches "
    "anything. Rules are tried in order and the first one that matches decides; if none does, "
    "the side's default decides. A fragment after the first gets the verdict of its datagram's "
    "first fragment; one arriving before its first fragment carries no ports and never matches a "
    "rule with ports, sports or icmp-types."
)

EXAMPLE = """\
zones:
  external: [wan0]
  internal: {interfaces: [lan0], networks: [10.0.0.0/24, fd00::/64]}
  dmz: {faces: inside, interfaces: [dmz0], networks: [10.0.2.0/24]}
defaults: {ingress: drop, egress: accept, between: drop, invalid: drop}
sets:
  office: [198.51.100.0/24, 2001:db8:100::/48]
  blocklist: {file: /etc/nfqfw/sets/drop.txt, comment: Spamhaus DROP}
  banned: {}
  partners: {}
nat:
  masquerade:
    - {out: wan0, from: [10.0.0.0/24, 10.0.2.0/24]}
  forward:
    - {name: smtp, proto: tcp, in: wan0, ports: [smtp, submission], to: 10.0.0.25, address: 203.0.113.1}
    - {name: partner-web, proto: tcp, in: wan0, ports: 8443, to: 10.0.2.80, to-port: 443, from: "@partners"}
ingress:
  - {name: drop-listed, from: ["@blocklist", "@banned"], action: drop}
  - name: ssh-office
    proto: tcp
    from: ["@office", 192.0.2.7]
    to: gateway
    ports: [ssh]
    action: accept
    comment: office and the on-call laptop
  - name: ping-gateway
    proto: icmp
    icmp-types: [echo-request]
    to: gateway
    limit: 5/second
    action: accept
egress:
  - {name: no-smb-out, proto: tcp, ports: [445], action: reject, log: true}
between:
  - {name: lan-to-dmz-web, from-zone: internal, to-zone: dmz, proto: tcp, ports: [80, 443], action: accept}
options:
  log-format: json"""


def render() -> str:
    out = [
        f'.\\" Generated by nfqfw.docs.policy for nfqfw {__version__}.',
        roff.title("nfqfw-policy", 5, __version__, "File Formats"),
        roff.section("name"),
        "nfqfw\\-policy \\- the policy file of nfqfw, a stateful NFQUEUE firewall",
        roff.section("description"),
        roff.paragraph(DESCRIPTION),
    ]
    for part, entries in KEYS.items():
        out.append(roff.section(HEADINGS[part]))
        if part == "rule":
            out.append(roff.paragraph(RULES_INTRO))
        for key, (syntax, meaning) in entries.items():
            out.append(roff.item(f"{roff.bold(key + ':')} {roff.italic(syntax)}", meaning))
    out += [
        roff.section("example"),
        roff.example(EXAMPLE),
        roff.section("files"),
        roff.item(roff.italic("/etc/nfqfw/policy.yaml"), "the policy of the nfqfw service"),
        roff.item(roff.italic("/var/lib/nfqfw/sets.json"), "the runtime entries of the sets (nfqfw set add)"),
        roff.item(roff.italic("/usr/share/doc/nfqfw/examples/"), "example policies"),
        roff.section("see also"),
        roff.text("nfqfw(8), iptables-extensions(8)"),
    ]
    return "\n".join(out) + "\n"
