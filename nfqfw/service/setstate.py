"""The sets' runtime entries on disk (`nfqfw set add`), and what `nfqfw set list` answers.

STATE_DIR/sets.json keeps every set's runtime entries, so that they survive a restart (reloads
keep them in memory: they are the engine's, nfqfw.core.sets.RuntimeSets). An entry with a
timeout is kept with the time it had left and the wall-clock time of the save, so the time a
reboot took counts against it. Written atomically (nfqfw.service.statedir.write_atomically) by
the process that owns the kernel rules: the single daemon, or the supervisor of --workers (its
workers read the file when they start, and are told each change). Read only if trusted (root's,
not writable by others: whoever can write it decides what the sets drop); a bad file is logged
and moved aside as sets.json.bad, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

from nfqfw.core.config import PolicyConfig
from nfqfw.core.sets import RuntimeSets
from nfqfw.service.statedir import StateFileError, read_trusted, write_atomically

log = logging.getLogger("nfqfw")

SETS_NAME = "sets.json"
VERSION = 1


def sets_path(state_dir: str) -> str:
    return os.path.join(state_dir, SETS_NAME)


def save_sets(state_dir: str, runtime: RuntimeSets, now: float, wall: float | None = None) -> bool:
    """Write every set's runtime entries; False (logged) when the state directory cannot take it."""
    document = {"version": VERSION, "saved": time.time() if wall is None else wall, "sets": runtime.dump(now)}
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        write_atomically(sets_path(state_dir), json.dumps(document, indent=1).encode())
    except OSError as err:
        log.error("cannot save the sets' runtime entries in %s: %s", state_dir, err)
        return False
    return True


def load_sets(state_dir: str, runtime: RuntimeSets, now: float, wall: float | None = None) -> int:
    """Put the saved runtime entries into `runtime` (those whose time ran out meanwhile left out);
    returns how many. A missing file is none; a bad one is logged and moved aside."""
    path = sets_path(state_dir)
    try:
        data = read_trusted(path)
    except FileNotFoundError:
        return 0
    except StateFileError as err:
        log.error("%s: not used: %s", path, err)
        return 0
    try:
        entries = _entries(json.loads(data), time.time() if wall is None else wall)
    except (ValueError, KeyError, TypeError) as err:
        log.error("%s: not the sets' runtime entries (%s): moved aside as %s.bad", path, err, SETS_NAME)
        with contextlib.suppress(OSError):
            os.replace(path, path + ".bad")
        return 0
    return runtime.load(entries, now)


def _entries(document: Any, wall: float) -> dict[str, list[tuple[str, float | None]]]:
    if document.get("version") != VERSION:
        raise ValueError(f"version {document.get('version')!r}")
    elapsed = max(0.0, wall - float(document["saved"]))
    kept: dict[str, list[tuple[str, float | None]]] = {}
    for name, items in document["sets"].items():
        for text, left in items:
            if left is None:
                kept.setdefault(str(name), []).append((str(text), None))
            elif float(left) - elapsed > 0:
                kept.setdefault(str(name), []).append((str(text), float(left) - elapsed))
    return kept


def set_listing(config: PolicyConfig, name: str, runtime: RuntimeSets, now: float) -> dict[str, Any]:
    """The answer to `nfqfw set list NAME`: the set's policy part (counted) and its runtime entries."""
    found = config.sets[name]
    content = found.content
    return {
        "name": name,
        "comment": found.comment,
        "file": found.path,
        "defined_at": f"{found.defined_in}:{found.line}",
        "policy_networks": found.content.written,
        "policy_ranges": {"ipv4": len(content.v4), "ipv6": len(content.v6)},
        "runtime": [
            {
                "addr": str(entry.network),
                "expires_in": None if entry.expires is None else max(0.0, entry.expires - now),
            }
            for entry in runtime.entries(name).entries()
        ],
    }


def sets_status(config: PolicyConfig, runtime: RuntimeSets, errors: dict[str, str]) -> list[dict[str, Any]]:
    """The sets part of `nfqfw status`: each set's sizes, file, comment, and a watched file's error."""
    out = []
    for name, found in config.sets.items():
        entry: dict[str, Any] = {
            "name": name,
            "policy_networks": found.content.written,
            "runtime_entries": len(runtime.entries(name)) if name in runtime else 0,
            "file": found.path,
            "comment": found.comment,
        }
        if name in errors:
            entry["error"] = errors[name]
        out.append(entry)
    return out
