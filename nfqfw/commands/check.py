"""`nfqfw check FILE...`: validate policy files without touching the system."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nfqfw.commands import EXIT_FAILURE, EXIT_OK, add_json_option, print_json
from nfqfw.core.config import ConfigError, ConfigIssue, PolicyConfig, load_policy
from nfqfw.core.policy import CompiledPolicy


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="validate policy files",
        description="Load and compile each policy file. Prints a one-line summary per valid file "
        "(and its warnings, FILE:LINE:COL: warning: message, on stderr); otherwise prints every "
        "problem as FILE:LINE:COL: message on stderr and exits with 1.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="policy file (YAML)")
    add_json_option(parser, "one object per file (file, ok, counts or errors) in a list")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    results = [check_file(path) for path in args.files]
    if args.json:
        print_json(results)
    else:
        for result in results:
            print_result(result)
    return EXIT_OK if all(result["ok"] for result in results) else EXIT_FAILURE


def check_file(path: str) -> dict[str, Any]:
    """{"file", "ok": true, "zones", "ingress_rules", "egress_rules", "warnings": [{"file", "line",
    "col", "message"}]} or {"file", "ok": false, "errors": [...the same...]}."""
    try:
        config = load_policy(path)
        CompiledPolicy(config)  # compiling must work too, as the daemon will do it
    except ConfigError as err:
        return {"file": path, "ok": False, "errors": [issue._asdict() for issue in err.issues]}
    warnings = [issue._asdict() for issue in config.warnings]
    return {"file": path, "ok": True, **counts(config), "warnings": warnings}


def counts(config: PolicyConfig) -> dict[str, int]:
    return {
        "zones": sum(1 for names in config.zones.values() if names),
        "ingress_rules": len(config.ingress),
        "egress_rules": len(config.egress),
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
    return f"{path}: OK ({numbers})"
