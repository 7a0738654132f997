"""Just enough man(7) roff: escaping and the few macros the pages use."""

from __future__ import annotations

import os
import time


def text(words: str) -> str:
    """Plain text for a roff line: backslashes and minus signs escaped, no control character
    at the start of a line."""
    escaped = words.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line for line in escaped.split("\n")]
    return "\n".join(lines)


def bold(words: str) -> str:
    return f"\\fB{text(words)}\\fR"


def italic(words: str) -> str:
    return f"\\fI{text(words)}\\fR"


def title(name: str, section: int, version: str, manual: str) -> str:
    """The .TH line; the date is SOURCE_DATE_EPOCH's (a reproducible package build) or today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = time.gmtime(int(epoch)) if epoch and epoch.isdigit() else time.gmtime()
    date = time.strftime("%Y-%m-%d", when)
    return f'.TH {name.upper()} {section} "{date}" "nfqfw {version}" "{manual}"'


def section(name: str) -> str:
    return f".SH {name.upper()}"


def subsection(words: str) -> str:
    return f'.SS "{text(words)}"'


def paragraph(words: str) -> str:
    return ".PP\n" + text(words)


def item(term: str, words: str) -> str:
    """A tagged paragraph: `term` (already roff) then `words`."""
    return f".TP\n{term}\n{text(words)}"


def example(lines: str) -> str:
    """A literal block (no filling)."""
    return ".PP\n.RS 4\n.nf\n" + text(lines) + "\n.fi\n.RE"
