"""nfqfw: a stateful NFQUEUE firewall daemon for Linux gateways."""

__version__ = "0.1.0"
