"""`nfqfw check FILE...`: validate policy files without touching the system.

`nfqfw check --diff OLD NEW`: both validated, and what changed from OLD to NEW (rules by name:
added, removed, changed field by field, reordered; sets, defaults, options, zones, NAT), for
review in CI; exit code 1 only when either is invalid."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_json_option, print_json
from nfqfw.core.config import ConfigError, ConfigIssue, PolicyConfig, ipv6_nat_issues, load_policy
from nfqfw.core.policy import CompiledPolicy
from nfqfw.firewall import backend_named


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate policy files",
        description="Load and compile each policy file. Prints a one-line summary per valid file (zones, "
        "rules, NAT, and how long compiling the rules took) and its warnings (FILE:LINE:COL: warning: "
        "message, on stderr); otherwise prints every problem as FILE:LINE:COL: message on stderr and "
        "exits with 1. A policy that translates IPv6 is checked against this kernel's IPv6 NAT (as "
        "root: tried in a throwaway network namespace).",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    parser.add_argument(
        "--diff",
        action="store_true",
        help="with two files OLD NEW: what changed from OLD to NEW (rules, sets, defaults, options, NAT)",
    )
    add_json_option(
        parser, "one object per file (file, ok, counts or errors) in a list; with --diff the changes"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.diff:
        return run_diff(args)
    results = [check_file(path) for path in args.files]
    if args.json:
        print_json(results)
    else:
        for result in results:
            print_result(result)
    return EXIT_OK if all(result["ok"] for result in results) else EXIT_FAILURE


def check_file(path: str) -> dict[str, Any]:
    """{"file", "ok": true, "zones", "ingress_rules", "egress_rules", "rules", "compile_seconds",
    "warnings": [{"file", "line", "col", "message"}]} or {"file", "ok": false, "errors": [...the same...]}."""
    try:
        config = load_policy(path)
        _check_ipv6_nat(config)
        started = time.perf_counter()
        CompiledPolicy(config)  # compiling must work too, as the daemon will do it
        seconds = time.perf_counter() - started
    except ConfigError as err:
        return {"file": path, "ok": False, "errors": [issue._asdict() for issue in err.issues]}
    warnings = [issue._asdict() for issue in config.warnings]
    return {
        "file": path,
        "ok": True,
        **counts(config),
        "compile_seconds": round(seconds, 6),
        "warnings": warnings,
    }


def _check_ipv6_nat(config: PolicyConfig) -> None:
    """Raise the located errors of IPv6 NAT entries when this kernel has no IPv6 NAT."""
    if config.nat is None or not config.nat.ipv6_entries():
        return
    missing = backend_named().ipv6_nat_missing()
    if missing is not None:
        raise ConfigError(ipv6_nat_issues(config, missing))


def run_diff(args: argparse.Namespace) -> int:
    from nfqfw.core.diff import diff_lines, policy_diff

    if len(args.files) != 2:
        print("nfqfw check: --diff takes two files, OLD and NEW", file=sys.stderr)
        return EXIT_USAGE
    configs = []
    for path in args.files:
        try:
            configs.append(load_policy(path))
        except ConfigError as err:
            for issue in err.issues:
                print(issue, file=sys.stderr)
            print(f"{path}: {len(err.issues)} error{'s' if len(err.issues) != 1 else ''}", file=sys.stderr)
    if len(configs) != 2:
        return EXIT_FAILURE
    old, new = configs
    changes = policy_diff(old, new)
    if args.json:
        print_json({"old": args.files[0], "new": args.files[1], "changes": changes})
    else:
        print(f"--- {args.files[0]}\n+++ {args.files[1]}")
        print("\n".join(diff_lines(changes)))
    return EXIT_OK


def counts(config: PolicyConfig) -> dict[str, int]:
    nat = config.nat
    return {
        "zones": sum(1 for names in config.zones.values() if names),
        "ingress_rules": len(config.ingress),
        "egress_rules": len(config.egress),
        "between_rules": len(config.between),
        "rules": len(config.ingress) + len(config.egress) + len(config.between),
        "masquerade": 0 if nat is None else len({(e.line, e.col) for e in nat.masquerade}),
        "snat": 0 if nat is None else len({(e.line, e.col) for e in nat.snat}),
        "forwards": 0 if nat is None else len(nat.forward),
        "sets": len(config.sets),
        "set_networks": sum(found.content.written for found in config.sets.values()),
        "files": len(config.sources),
    }


def print_result(result: dict[str, Any]) -> None:
    path = result["file"]
    if result["ok"]:
        print(summary(path, result))
        for warning in result["warnings"]:
            print(ConfigIssue(**warning), file=sys.stderr)
        return
    for issue in result["errors"]:
        print(ConfigIssue(**issue), file=sys.stderr)
    count = len(result["errors"])
    print(f"{path}: {count} error{'s' if count != 1 else ''}", file=sys.stderr)


def summary(path: str, counted: dict[str, Any]) -> str:
    numbers = (
        f"zones: {counted['zones']}, ingress rules: {counted['ingress_rules']}, "
        f"egress rules: {counted['egress_rules']}"
    )
    if counted.get("between_rules"):
        numbers += f", between rules: {counted['between_rules']}"
    nat = [
        f"{counted[key]} {word}{'s' if counted[key] != 1 and word == 'forward' else ''}"
        for key, word in (("masquerade", "masquerade"), ("snat", "snat"), ("forwards", "forward"))
        if counted.get(key)
    ]
    if nat:
        numbers += f", nat: {', '.join(nat)}"
    if counted.get("sets"):
        numbers += f", sets: {counted['sets']} ({counted['set_networks']} networks)"
    if counted.get("files", 1) > 1:
        numbers += f", files: {counted['files']}"
    rules = counted["rules"]
    compiled = f"{rules} rule{'s' if rules != 1 else ''} compiled in {duration(counted['compile_seconds'])}"
    return f"{path}: OK ({numbers}), {compiled}"


def duration(seconds: float) -> str:
    """`12.3 ms` below a second, `1.25 s` from there."""
    milliseconds = round(seconds * 1000, 1)
    return f"{milliseconds:.1f} ms" if milliseconds < 1000 else f"{seconds:.2f} s"
