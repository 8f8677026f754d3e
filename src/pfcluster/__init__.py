"""pfcluster: OpenBSD pf stateful filtering and pfsync v5 for active-active Linux firewalls."""

__version__ = "0.1.0"
