"""Scraping nfqfw's Prometheus endpoint in the lab (test_lab_observe, test_lab_workers)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from nfqfw.lab import traffic
from nfqfw.lab.daemon_ctl import Lab

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(lab: Lab, url: str) -> Samples:
    """GET `url` from inside the gateway namespace: (sample name, sorted labels) -> value."""
    with traffic.entered(lab.topology.gw), urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
