"""`python -m nfqfw.docs OUTDIR`: write nfqfw.8, nfqfw-policy.5 and nfqfw.bash-completion there."""

from __future__ import annotations

import sys
from pathlib import Path

from nfqfw.docs import completion, manpage, policy

OUTPUTS = {
    "nfqfw.8": manpage.render,
    "nfqfw-policy.5": policy.render,
    "nfqfw.bash-completion": completion.render,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m nfqfw.docs OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, render in OUTPUTS.items():
        (out / name).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
