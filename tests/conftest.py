"""Shared test settings: fuzz sizes and the checks that gate root-only tests."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

# The issues ask for 100k fuzz inputs per decoder; PFCLUSTER_FUZZ_EXAMPLES shrinks that
# while developing (CI keeps the full count).
FUZZ_EXAMPLES = int(os.environ.get("PFCLUSTER_FUZZ_EXAMPLES", "100000"))

settings.register_profile(
    "pfcluster",
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("pfcluster")


def fuzz_settings(examples: int = FUZZ_EXAMPLES) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=True)


def batched_fuzz_settings(inputs_per_example: int) -> settings:
    """For fuzzers that check several inputs per example: FUZZ_EXAMPLES inputs in all."""
    return fuzz_settings(max(1, -(-FUZZ_EXAMPLES // inputs_per_example)))


def root_unavailable_reason() -> str | None:
    """Why namespace/iptables tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, NFQUEUE)"
    for tool in ("ip", "iptables-legacy"):
        if shutil.which(tool) is None:
            return f"needs {tool} (run scripts/install)"
    if not os.path.exists("/proc/sys/net/ipv4/ip_forward"):
        return "no /proc/sys/net (not a Linux network stack)"
    return None


@pytest.fixture
def need_root() -> None:
    reason = root_unavailable_reason()
    if reason:
        pytest.skip(reason)
