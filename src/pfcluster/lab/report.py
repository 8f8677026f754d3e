"""Lab results as a rich table, a JSON file, a Markdown table and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and spec:
        return format(v, spec)
    return str(v)


COLUMNS = (
    ("configuration", "name", ""),
    ("goodput Mbit/s", "goodput_mbps", ".1f"),
    ("x single", "ratio_single", ".2f"),
    ("x symmetric", "ratio_symmetric", ".2f"),
    ("retransmits", "retransmits", ""),
    ("resets", "resets", ""),
    ("state-mismatch", "state_mismatch", ""),
    ("sync B / data B", "sync_bytes_per_data_byte", ".2e"),
    ("stalled streams", "stalled_streams", ""),
    ("port reuse ok", "port_reuse", ""),
    ("survived failover", "survived_failover", ""),
    ("server saw NAT addr", "nat_seen", ""),
)
OPTIONAL_COLUMNS = ("port_reuse", "survived_failover", "nat_seen")  # shown only when some row has a value


def _columns(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = doc["summary"]
    return [c for c in COLUMNS
            if c[1] not in OPTIONAL_COLUMNS or any(r.get(c[1]) is not None for r in rows)]


def compare_table(doc: dict[str, Any]) -> Table:
    title = (
        f"pfcluster lab compare — {doc['firewall']} firewalls, "
        f"{doc['seconds']:g} s, {doc['streams']} TCP streams"
    )
    table = Table(title=title)
    columns = _columns(doc)
    for head, _, _ in columns:
        table.add_column(head, justify="left" if head == "configuration" else "right")
    for row in doc["summary"]:
        table.add_row(*(_fmt(row.get(key), spec) for _, key, spec in columns))
    return table


def compare_markdown(doc: dict[str, Any]) -> str:
    """The same table for the README."""
    columns = _columns(doc)
    lines = [
        "| " + " | ".join(h for h, _, _ in columns) + " |",
        "|" + "|".join("---" if h == "configuration" else "---:" for h, _, _ in columns) + "|",
    ]
    for row in doc["summary"]:
        lines.append("| " + " | ".join(_fmt(row.get(k), s) for _, k, s in columns) + " |")
    notes = [f"- {row['name']}: {row['error']}" for row in doc["summary"] if row.get("error")]
    if notes:
        lines += ["", *notes]
    checks = doc.get("acceptance") or {}
    if checks:
        lines.append("")
        lines += [f"- {name}: {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()]
    return "\n".join(lines) + "\n"


def print_compare(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(compare_table(doc))
    for name, ok in (doc.get("acceptance") or {}).items():
        console.print(f"  {name}: " + ("[green]PASS[/]" if ok else "[red]FAIL[/]"))
    for run in doc["runs"]:
        for err in run.get("errors") or []:
            console.print(f"  [yellow]{run['name']}[/]: {err}")
    for row in doc["summary"]:
        if row.get("error"):
            console.print(f"  [yellow]{row['name']}[/]: iperf3: {row['error']}")


def _resets(r: dict[str, int] | None) -> str:
    return "-" if not r else f"{r['client']}, {r['server']}"


def run_table(doc: dict[str, Any]) -> Table:
    """One `lab run`: its headline figures and each firewall's counters."""
    table = Table(title=f"pfcluster lab run — {doc['name']} ({doc['firewall']} firewalls)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("goodput Mbit/s", f"{doc['goodput_bps'] / 1e6:.1f}"),
        ("retransmits", doc["retransmits"]),
        ("stalled streams", doc["stalled_streams"]),
        ("state-mismatch", doc["state_mismatch"]),
        ("sync bytes / data byte", _fmt(doc["sync_bytes_per_data_byte"], ".2e")),
        ("TCP resets during transfer (client, server)", _resets(doc["resets"]["during"])),
        ("TCP resets incl. iperf3 teardown", _resets(doc["resets"]["total"])),
    ]
    if "failover" in doc:
        fo = doc["failover"]
        rows.append(("failover at s", fo.get("at_s")))
        rows.append(("survived failover", fo.get("survived")))
    if "nat" in doc:
        nat = doc["nat"]
        rows.append(("server saw", ", ".join(nat["server_saw"]) or "-"))
        rows.append(("translated (only the NAT address seen)", nat["translated"]))
    if "integrity" in doc:
        rows.append(("integrity (SHA-256)", "intact" if doc["integrity"]["intact"] else "CORRUPT"))
    for fw in doc["firewalls"]:
        c = fw["counters"]
        rows.append((
            f"{fw['name']} packets/blocked/mismatch/deferrals",
            "/".join(_fmt(c.get(k)) for k in ("packets", "blocked", "state-mismatch", "deferrals")),
        ))
        s = fw["sync_link"]
        rows.append((f"{fw['name']} sync frames out/in, bytes out/in",
                     f"{s['frames_out']}/{s['frames_in']}, {s['bytes_out']}/{s['bytes_in']}"))
    for k, v in rows:
        table.add_row(k, _fmt(v))
    return table


def sweep_table(doc: dict[str, Any]) -> Table:
    table = Table(title=f"pfcluster lab sweep — split, {doc['firewall']} firewalls, MSS {doc['mss']}")
    for head in ("offered pps", "measured pps", "goodput Mbit/s", "goodput/offered",
                 "state-mismatch", "retransmits", "stalled", "busiest daemon CPU",
                 "host CPU", "sync B/data B"):
        table.add_column(head, justify="right")
    for p in doc["points"]:
        table.add_row(
            str(p["pps"]), _fmt(p["measured_pps"]), f"{p['goodput_bps'] / 1e6:.1f}",
            _fmt(p["goodput_ratio"], ".3f"), _fmt(p["state_mismatch"]),
            _fmt(p["retransmits"]), _fmt(p["stalled_streams"]),
            _fmt(p.get("max_cpu_share"), ".2f"), _fmt(p.get("host_cpu_busy"), ".2f"),
            _fmt(p.get("sync_bytes_per_data_byte"), ".3f"),
        )
    return table


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _is_anchor(row: dict[str, Any]) -> bool:
    return str(row.get("sync", "")).startswith("conntrackd")


def compare_chart(doc: dict[str, Any], path: str | Path) -> None:
    """Goodput per configuration (ratio to the single firewall on each bar) and sync cost."""
    plt = _pyplot()
    rows = doc["summary"]
    names = [r["name"] for r in rows]
    goodput = [r["goodput_mbps"] or 0.0 for r in rows]
    anchors = any(_is_anchor(r) for r in rows)
    colors = ["#888888" if r["name"] == "single" else
              "#d62728" if (r.get("stalled_streams") or not r.get("ok")) else
              "#ff7f0e" if _is_anchor(r) else "#1f77b4"
              for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15 if anchors else 11, 4.8 if anchors else 4.2),
                                   gridspec_kw={"width_ratios": [3, 2]})
    bars = ax1.bar(names, goodput, color=colors)
    # label each bar with its ratio to the single firewall (or to symmetric without one)
    key, unit = ("ratio_single", "x") if any(r.get("ratio_single") for r in rows) else (
        "ratio_symmetric", "x sym")
    for bar, r in zip(bars, rows):
        # an anchor row has no single-firewall ratio: its ratio to the anchor's symmetric pair
        ratio, suffix = (r.get("ratio_symmetric"), "x sym") if _is_anchor(r) else (r.get(key), unit)
        label = f"{ratio:.2f}{suffix}" if ratio else "failed"
        ax1.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=9)
    ax1.set_ylabel("goodput, Mbit/s")
    ax1.set_title(f"TCP goodput ({doc['firewall']} firewalls, {doc['streams']} streams)")
    sync = [r.get("sync_bytes_per_data_byte") or 0.0 for r in rows]
    ax2.bar(names, [s * 100 for s in sync], color="#2ca02c")
    ax2.set_ylabel("sync bytes per 100 data bytes")
    ax2.set_title("sync overhead (pfsync; conntrackd on anchor rows)" if anchors else "pfsync overhead")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=35 if anchors else 20)
        if anchors:
            for lbl in ax.get_xticklabels():
                lbl.set_horizontalalignment("right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_chart(doc: dict[str, Any], path: str | Path) -> None:
    """Goodput ratio and state-mismatch against the offered packet rate."""
    plt = _pyplot()
    pts = doc["points"]
    pps = [p["pps"] for p in pts]
    fig, ax1 = plt.subplots(figsize=(8, 4.2))
    ax1.plot(pps, [p["goodput_ratio"] for p in pts], "o-", color="#1f77b4")
    ax1.set_xscale("log")
    ax1.set_xlabel("offered packets per second (split paths)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax1.xaxis.set_major_formatter(ScalarFormatter())
    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.set_xticks(pps)
    ax1.tick_params(axis="x", rotation=30)
    ax1.set_ylabel("goodput / offered", color="#1f77b4")
    ax1.set_ylim(0, max([1.1] + [p["goodput_ratio"] + 0.05 for p in pts]))
    ax2 = ax1.twinx()
    mismatch = [p["state_mismatch"] or 0 for p in pts]
    ax2.plot(pps, mismatch, "s--", color="#d62728")
    ax2.set_ylim(0, max([*mismatch, 1]) * 1.15)
    ax2.set_ylabel("state-mismatch drops", color="#d62728")
    ax1.set_title(f"split v5 rate sweep ({doc['firewall']} firewalls, MSS {doc['mss']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
