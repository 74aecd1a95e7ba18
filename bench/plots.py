"""The figures of docs/benchmarks.md: PNGs drawn from result dicts (no measuring).

A benchmark's figures are the functions here registered under its name with
`@figure(name, key, caption)`; each draws one result into a matplotlib
Figure. `draw(name, result, img_dir)` writes them as
`img_dir/bench-<name>-<key>.png` and returns `[(caption, path)]`; bench.run
embeds them under the benchmark's heading. Every figure has a footer line
with the measurement date (UTC) and the machine (kernel, CPU, cores, load at
the start), from the result's `date` and `machine`.

matplotlib comes from the `bench` extra (`pip install -e '.[bench]'`;
`make bench` installs it) and is imported only when drawing, on the Agg
backend; `missing()` says why it cannot be, and the page is then rendered
with its tables only. The same result gives the same bytes: fixed size and
dpi, matplotlib's default style whatever matplotlibrc says, no software tag.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Mapping

from bench.record import machine_brief, when

INSTALL_HINT = "pip install -e '.[bench]'"
SIZE = (9.0, 4.8)  # inches
DPI = 100
COLORS = {"reference": "#7f7f7f", "fan": "#1f77b4", "fan-server": "#1f77b4", "fan-noguard": "#9ecae1",
          "fan-standalone": "#ff7f0e", "underlay": "#7f7f7f", "flannel": "#2ca02c",
          "fan6": "#6baed6", "underlay6": "#bdbdbd", "fan_direct": "#08306b", "hostgw": "#98df8a"}
_RC = {"font.size": 9, "axes.titlesize": 10, "figure.titlesize": 11, "legend.fontsize": 8,
       "axes.grid": True, "grid.alpha": 0.3, "axes.axisbelow": True}

Drawer = Callable[[object, Mapping], None]
FIGURES: dict[str, list[tuple[str, str, Drawer]]] = {}


def figure(name: str, key: str, caption: str) -> Callable[[Drawer], Drawer]:
    """Register `fn(fig, result)` as figure `key` of benchmark `name`."""
    def register(fn: Drawer) -> Drawer:
        FIGURES.setdefault(name, []).append((key, caption, fn))
        return fn
    return register


def missing() -> str | None:
    """None when figures can be drawn; otherwise why not, in a few words."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    except Exception as exc:  # a broken install must not break the page
        return f"matplotlib does not import ({type(exc).__name__}: {exc})"
    matplotlib.use("Agg")
    return None


def path_for(img_dir: Path, name: str, key: str) -> Path:
    return Path(img_dir) / f"bench-{name}-{key}.png"


def draw(name: str, result: Mapping, img_dir: Path | str) -> list[tuple[str, Path]]:
    """Write the figures of benchmark `name`; a figure that fails is reported and left out."""
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = []
    for key, caption, fn in FIGURES.get(name, []):
        path = path_for(Path(img_dir), name, key)
        try:
            with matplotlib.style.context(["default", _RC]):
                fig = Figure(figsize=SIZE, dpi=DPI)
                FigureCanvasAgg(fig)
                fn(fig, result)
                fig.text(0.01, 0.012, f"Measured {when(result)} UTC on {machine_brief(result.get('machine', {}))}",
                         fontsize=7.5, color="#555555", ha="left", va="bottom")
                fig.tight_layout(rect=(0, 0.045, 1, 1))
                path.parent.mkdir(parents=True, exist_ok=True)
                fig.savefig(path, dpi=DPI, metadata={"Software": None})
        except Exception as exc:
            print(f"bench: figure {path.name} failed ({type(exc).__name__}: {exc}); left out", file=sys.stderr)
            continue
        done.append((caption, path))
    return done


def _labels(result: Mapping, defaults: Mapping[str, str]) -> dict:
    return {**defaults, **result.get("labels", {})}


def _bar_labels(ax, bars, fmt: str = "{:g}") -> None:
    ax.bar_label(bars, labels=[fmt.format(b.get_height()) for b in bars], padding=2, fontsize=7.5)


# -- bridge_scale ---------------------------------------------------------------------

_SCALE_ORDER = ("reference", "fan", "fan-noguard")
_SCALE_LABELS = {"reference": "reference: bridge + host-local", "fan": "fan (guard on: defaults)",
                 "fan-noguard": "fan, neighSuppress and antiSpoof off"}


def _sizes(bulk: Mapping) -> list[str]:
    return sorted(bulk, key=int)


@figure("bridge_scale", "add-del", "Time to ADD and to DEL all N pods on one node, fan against bridge + host-local")
def _scale_add_del(fig, result: Mapping) -> None:
    bulk, labels = result.get("bulk", {}), _labels(result, _SCALE_LABELS)
    sizes = _sizes(bulk)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, verb in zip(axes, ("add", "del")):
        for v in _SCALE_ORDER:
            points = [(int(n), bulk[n][v][f"{verb}_wall_s"]) for n in sizes if v in bulk[n]]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", color=COLORS[v], label=labels[v],
                        linestyle="--" if v == "fan-noguard" else "-")
        ax.set_title(f"{verb.upper()} all N pods")
        ax.set_xlabel("pods on the node (N)")
        ax.set_xticks([int(n) for n in sizes])
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("wall time, first call to last exit (s)")
    axes[0].legend(loc="upper left")
    fig.suptitle(f"ADD and DEL of N pods, {result.get('method', {}).get('parallel', '?')} calls at a time")


@figure("bridge_scale", "broadcast", "ARP broadcast frames delivered to other pods per ARP resolution")
def _scale_broadcast(fig, result: Mapping) -> None:
    bulk, labels = result.get("bulk", {}), _labels(result, _SCALE_LABELS)
    sizes = _sizes(bulk)
    ax = fig.subplots()
    present = [v for v in _SCALE_ORDER if any(v in bulk[n] for n in sizes)]
    width = 0.8 / max(1, len(present))
    for i, v in enumerate(present):
        xs = [j + (i - (len(present) - 1) / 2) * width for j, n in enumerate(sizes) if v in bulk[n]]
        ys = [bulk[n][v]["broadcast"]["broadcast_per_resolution"] for n in sizes if v in bulk[n]]
        _bar_labels(ax, ax.bar(xs, ys, width, color=COLORS[v], label=labels[v]))
    ax.set_xticks(range(len(sizes)), [f"N = {n}" for n in sizes])
    ax.set_xlabel("pods on the node")
    ax.set_ylabel("ARP frames to pods neither asking nor asked,\nper resolution")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.legend(loc="upper left")
    targets = result.get("method", {}).get("targets", "?")
    ax.set_title(f"ARP broadcasts reaching other pods ({targets} resolutions per N; fan with its guard: 0)")


# -- latency --------------------------------------------------------------------------

_LAT_ORDER = ("reference", "fan-server", "fan-standalone")
_LAT_LABELS = {"reference": "reference: bridge + host-local", "fan-server": "fan, plugin server running",
               "fan-standalone": "fan, standalone (no server)"}


@figure("latency", "add-del", "ADD and DEL latency per call (median, p90 whisker), sequential and concurrent")
def _latency(fig, result: Mapping) -> None:
    labels, method = _labels(result, _LAT_LABELS), result.get("method", {})
    axes = fig.subplots(1, 2, sharey=True)
    titles = {"sequential": f"sequential: {method.get('pods_sequential', '?')} pods, one call at a time",
              "concurrent": f"concurrent: {method.get('concurrent', '?')} calls at once, "
                            f"{method.get('rounds', '?')} round(s)"}
    width = 0.26
    for ax, mode in zip(axes, ("sequential", "concurrent")):
        part = result.get(mode, {})
        present = [v for v in _LAT_ORDER if v in part]
        for i, v in enumerate(present):
            med = [part[v].get(verb, {}).get("median", 0) for verb in ("add", "del")]
            p90 = [part[v].get(verb, {}).get("p90", m) for verb, m in zip(("add", "del"), med)]
            xs = [j + (i - (len(present) - 1) / 2) * width for j in range(2)]
            bars = ax.bar(xs, med, width, color=COLORS[v], label=labels[v],
                          yerr=[[0, 0], [max(0, p - m) for p, m in zip(p90, med)]], capsize=3,
                          error_kw={"elinewidth": 1, "ecolor": "#333333"})
            _bar_labels(ax, bars, "{:.0f}")
        ax.set_xticks([0, 1], ["ADD", "DEL"])
        ax.set_yscale("log")
        ax.set_title(titles[mode])
    axes[0].set_ylabel("ms per call, log scale (bar: median, whisker: p90)")
    top = axes[0].get_ylim()[1]
    axes[0].set_ylim(top=top * 3)  # room for the legend and the labels
    axes[0].legend(loc="upper left")
    fig.suptitle("ADD/DEL latency per call: fan against bridge + host-local")


# -- throughput -----------------------------------------------------------------------

_TP_ORDER = ("underlay", "underlay6", "fan_direct", "hostgw", "fan", "fan6", "flannel")
_TP_TICKS = {"underlay": "underlay\nnode ↔ node", "underlay6": "underlay, IPv6\nnode ↔ node",
             "fan": "fan\npod ↔ pod (eBPF)",
             "fan6": "fan, IPv6\npod ↔ pod (eBPF)", "flannel": "flannel-style VXLAN\npod ↔ pod",
             "fan_direct": "fan, direct routing\npod ↔ pod", "hostgw": "host-gw-style\npod ↔ pod"}


@figure("throughput", "gbps", "Single-stream TCP throughput per path (median, min–max whisker, dots: each run)")
def _throughput(fig, result: Mapping) -> None:
    tp, method = result.get("throughput", {}), result.get("method", {})
    med, lo, hi = tp.get("median_gbps", {}), tp.get("min_gbps", {}), tp.get("max_gbps", {})
    runs = tp.get("runs", {})
    present = [v for v in _TP_ORDER if v in med]
    ax = fig.subplots()
    ys = [med[v] for v in present]
    err = [[max(0, med[v] - lo.get(v, med[v])) for v in present], [max(0, hi.get(v, med[v]) - med[v]) for v in present]]
    bars = ax.bar(range(len(present)), ys, 0.6, color=[COLORS[v] for v in present], yerr=err, capsize=5,
                  error_kw={"elinewidth": 1, "ecolor": "#333333"})
    ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], label_type="center", color="white", fontweight="bold")
    for i, v in enumerate(present):
        values = [r["gbps"] for r in runs.get(v, []) if r.get("gbps") is not None]
        if values:
            ax.plot([i + 0.2] * len(values), values, linestyle="none", marker="o", markersize=3,
                    color="#222222", alpha=0.6)
    ax.set_xticks(range(len(present)), [_TP_TICKS.get(v, v) for v in present])
    ax.set_ylabel("Gbit/s received")
    ax.set_ylim(bottom=0)
    ratios = tp.get("ratios", {})
    six = f", fan IPv6 / IPv4: {ratios['fan6_over_fan']}" if ratios.get("fan6_over_fan") is not None else ""
    if ratios.get("fan_direct_over_hostgw") is not None:
        six += f",\nfan direct / host-gw-style: {ratios['fan_direct_over_hostgw']}, / underlay: " \
               f"{ratios.get('fan_direct_over_underlay')}"
    ax.set_title(f"Single TCP stream, {method.get('rounds', '?')} rounds of {method.get('seconds_per_run', '?')} s "
                 f"(fan / flannel-style: {ratios.get('fan_over_flannel')}{six}); whiskers min–max, dots each run")


@figure("throughput", "entries", "Per-node datapath entries as the lab grows, fan against flannel-style VXLAN")
def _entries(fig, result: Mapping) -> None:
    rows = result.get("entries", {}).get("rows", [])
    ax = fig.subplots()
    for v, label in (("fan", "fan"), ("flannel", "flannel-style VXLAN"), ("fan_direct", "fan, direct routing"),
                     ("hostgw", "host-gw-style")):
        points = [(r["nodes"], r.get(v, {}).get("node1", {}).get("total")) for r in rows]
        points = [(x, y) for x, y in points if y is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=COLORS[v], label=label)
        for x, y in points:  # fan's numbers below its line, flannel-style's above: apart where they meet
            ax.annotate(str(y), (x, y), textcoords="offset points", xytext=(0, -12 if v.startswith("fan") else 6),
                        ha="center", fontsize=7.5, color=COLORS[v])
    ax.set_xticks(sorted({r["nodes"] for r in rows}))
    ax.set_xlabel("nodes in the lab")
    ax.set_ylabel("entries on one node\n(routes + neighbours + FDB + tc filters)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    ax.legend(loc="upper left")
    ax.set_title("Per-node datapath state as the lab grows (no pods)")
