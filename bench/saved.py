"""Where a benchmark keeps its figures: bench/results/NAME.json, stamped with the run's time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, payload: dict[str, Any]) -> Path:
    """Write {"when": now, **payload} to bench/results/`name`, say so, and return the path."""
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}, indent=2) + "\n")
    print(f"saved bench/results/{name}")
    return path
