"""nfqfw(8), from the argparse definitions: every command, its usage, description, arguments
and options as `nfqfw --help` and `nfqfw COMMAND --help` know them, around written sections
(what nfqfw is, exit codes from nfqfw.commands, files, signals, logging, examples)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from nfqfw import __version__
from nfqfw.cli import build_parser
from nfqfw.commands import EXIT_CODES
from nfqfw.control.protocol import DEFAULT_RUNTIME_DIR, SOCKET_NAME
from nfqfw.docs import roff
from nfqfw.service.statedir import DEFAULT_STATE_DIR

DESCRIPTION = """\
nfqfw is a stateful firewall daemon for Linux gateways. The kernel hands it packets through \
NFQUEUE (iptables and ip6tables rules that nfqfw installs in its own chains NFQFW\\-INPUT, \
NFQFW\\-FORWARD and NFQFW\\-OUTPUT); nfqfw decodes them, tracks every flow with its own \
connection tracking, modelled on the kernel's nf_conntrack, checks the first packet of each new \
flow against a YAML policy (nfqfw\\-policy(5)) and answers accept, drop or reject."""

DESCRIPTION_MORE = """\
The commands fall in three groups: the offline policy tools (check, explain, replay), which need \
neither root nor a kernel; the daemon (run) and its kernel rules (rules); and the commands that \
ask the running daemon over its control socket (status, flows, flush, panic, reload, top), \
which are for root only."""

FILES = (
    ("/etc/nfqfw/policy.yaml", "the policy (nfqfw-policy(5)); refused if group or others may write it"),
    (f"{DEFAULT_STATE_DIR}/flows.snapshot", "the flow table, saved at stop and every --snapshot-interval "
     "seconds and restored at start (flows.queue-N.snapshot per worker with --workers)"),
    (f"{DEFAULT_RUNTIME_DIR}/{SOCKET_NAME}", "the control socket (mode 0600, root only)"),
    ("/usr/share/doc/nfqfw/", "README, example policies"),
)  # fmt: skip

ENVIRONMENT = (
    ("NOTIFY_SOCKET", "set by systemd for Type=notify: nfqfw sends READY=1, RELOADING=1, STOPPING=1, "
     "STATUS= and WATCHDOG=1 there"),
    ("WATCHDOG_USEC", "set by systemd's WatchdogSec=: nfqfw's packet loop sends the heartbeat"),
    ("JOURNAL_STREAM", "set by systemd when stderr goes to the journal: nfqfw then logs to journald "
     "natively, with fields (see LOGGING)"),
)  # fmt: skip

SIGNALS = (
    ("SIGTERM, SIGINT", "stop: the flows are saved, the kernel rules stay (fail-closed unless the policy "
     "says failure-mode: open)"),
    ("SIGHUP", "reload the policy (as nfqfw reload); an invalid file leaves the running policy in force"),
    ("SIGUSR1", "log every counter"),
)  # fmt: skip

LOGGING = """\
nfqfw logs to stderr. Under systemd, when JOURNAL_STREAM names its stderr, it logs to the journal \
natively: each entry has SYSLOG_IDENTIFIER=nfqfw, PRIORITY and NFQFW_EVENT (flow_verdict for a \
packet, daemon otherwise); a packet's entry also has NFQFW_ACTION, NFQFW_RULE, NFQFW_REASON, \
NFQFW_CT, NFQFW_HOOK, NFQFW_IN, NFQFW_OUT, NFQFW_SRC, NFQFW_DST, NFQFW_SPORT, NFQFW_DPORT, \
NFQFW_PROTO and NFQFW_FLOW_ID, so that journalctl selects on them. The policy option log\\-format \
chooses text lines or one JSON object per line with Suricata eve.json's names (timestamp, \
event_type, src_ip, src_port, dest_ip, dest_port, proto, in_iface, out_iface, hook, ct_state, \
action, reason, rule, flow_id). Packet lines are rate\\-limited (log\\-limit, log\\-limit\\-burst)."""

EXAMPLES = """\
nfqfw check /etc/nfqfw/policy.yaml
nfqfw explain \\-\\-config /etc/nfqfw/policy.yaml \\-\\-in wan0 tcp 198.51.100.7 10.0.0.25:25
systemctl enable \\-\\-now nfqfw
nfqfw status \\-q || echo "nfqfw is not running (exit code 3) or not answering (1)"
nfqfw flows \\-\\-proto tcp \\-\\-state ESTABLISHED
journalctl \\-u nfqfw NFQFW_RULE=mail
nfqfw top"""

SEE_ALSO = "nfqfw-policy(5), iptables(8), conntrack(8), systemctl(1), journalctl(1)"


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str | None]]:
    """(name, parser, one-line help) of the commands under `parser`, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            return [(name, sub, helps.get(name)) for name, sub in action.choices.items()]
    return []


def leaves(
    parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """(command words, parser) of every command that runs something: `status`, `rules show`,
    `lab up`, ... in the order nfqfw.cli registers them."""
    children = subcommands(parser)
    if not children:
        yield words, parser
    for name, sub, _ in children:
        yield from leaves(sub, (*words, name))


def options_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments and options a command takes (not -h)."""
    skip = (argparse._HelpAction, argparse._SubParsersAction)
    return [action for action in parser._actions if not isinstance(action, skip)]


def invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """'-c FILE, --config FILE' or 'FILE', as --help shows it."""
    formatter = parser._get_formatter()
    return formatter._format_action_invocation(action)


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    words = formatter._expand_help(action) if action.help else ""
    named = action.choices and all(str(choice) in words for choice in action.choices)
    if action.choices and not isinstance(action.choices, dict) and not named:
        listed = ", ".join(str(choice) for choice in action.choices)
        words = f"{words} (one of: {listed})" if words else f"one of: {listed}"
    return words


def usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def command_section(
    words: tuple[str, ...], parser: argparse.ArgumentParser, summary: str | None
) -> list[str]:
    """The section of a command, then those of its sub-commands (`rules show`, ...)."""
    out = [roff.subsection("nfqfw " + " ".join(words)), ".PP\n" + roff.bold(usage(parser))]
    description = parser.description or summary or ""
    if parser.formatter_class is argparse.RawDescriptionHelpFormatter:
        prose, _, picture = description.partition("\n\n")
        out.append(roff.paragraph(prose))
        if picture:
            out.append(roff.example(picture))
    elif description:
        out.append(roff.paragraph(description))
    for action in options_of(parser):
        out.append(roff.item(roff.bold(invocation(parser, action)), help_text(parser, action)))
    for name, sub, help_ in subcommands(parser):
        out += command_section((*words, name), sub, help_)
    return out


def render() -> str:
    parser = build_parser()
    out = [
        f'.\\" Generated by nfqfw.docs.manpage from the argparse definitions of nfqfw {__version__}.',
        roff.title("nfqfw", 8, __version__, "System Administration"),
        roff.section("name"),
        "nfqfw \\- stateful NFQUEUE firewall for Linux gateways",
        roff.section("synopsis"),
        f"{roff.bold('nfqfw')} [{roff.bold('--version')}] {roff.italic('COMMAND')} "
        f"[{roff.italic('OPTIONS')}]",
        roff.section("description"),
        ".PP\n" + DESCRIPTION,
        ".PP\n" + DESCRIPTION_MORE,
        roff.section("commands"),
    ]
    for name, sub, summary in subcommands(parser):
        out += command_section((name,), sub, summary)
    out.append(roff.section("exit status"))
    out += [roff.item(roff.bold(str(code)), meaning) for code, meaning in sorted(EXIT_CODES.items())]
    out.append(roff.section("files"))
    out += [roff.item(roff.italic(path), meaning) for path, meaning in FILES]
    out.append(roff.section("environment"))
    out += [roff.item(roff.bold(name), meaning) for name, meaning in ENVIRONMENT]
    out.append(roff.section("signals"))
    out += [roff.item(roff.bold(name), meaning) for name, meaning in SIGNALS]
    out += [roff.section("logging"), ".PP\n" + LOGGING]
    out += [roff.section("examples"), ".PP\n.RS 4\n.nf\n" + EXAMPLES + "\n.fi\n.RE"]
    out += [roff.section("see also"), roff.text(SEE_ALSO)]
    return "\n".join(out) + "\n"
