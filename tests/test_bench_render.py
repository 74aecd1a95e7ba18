"""`bench.run --render-only` draws the page's figures from results (synthetic here; nothing is measured).

matplotlib comes with the `test` extra, so the plots are really drawn; the
fallback without it is simulated by hiding the module.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import plots  # noqa: E402
from bench import run as bench_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATE = "2026-01-02T03:04:05Z"
MACHINE = {"kernel": "6.1.0-test", "cpu_model": "Test CPU", "cores": 2, "cores_usable": 2, "python": "3.11.7",
           "pyroute2": "0.9.7", "cni_fan": "0.1.0", "git_commit": "abc1234", "loadavg_1min_at_start": 0.5}
FIGURES = {"latency": ["add-del"], "throughput": ["gbps", "entries"], "bridge_scale": ["add-del", "broadcast"]}
TITLES = {"latency": "ADD/DEL latency", "throughput": "Throughput, per-node state",
          "bridge_scale": "The bridge at scale"}


def _stats(median: float) -> dict:
    return {"n": 3, "median": median, "p90": round(median * 1.2, 2), "mean": median, "min": round(median * 0.8, 2),
            "max": round(median * 1.3, 2)}


def _latency() -> dict:
    medians = {"reference": (15.0, 28.0), "fan-server": (40.0, 50.0), "fan-standalone": (230.0, 240.0)}

    def part(scale: float) -> dict:
        return {v: {"add": _stats(a * scale), "del": _stats(d * scale), "add_del_median_sum": (a + d) * scale,
                    "add_batch_wall": _stats(a * scale * 1.5), "del_batch_wall": _stats(d * scale * 1.5)}
                for v, (a, d) in medians.items()}

    return {"benchmark": "latency", "date": DATE, "machine": MACHINE,
            "method": {"pods_sequential": 3, "concurrent": 3, "rounds": 1, "rounds_requested": 1},
            "sequential": part(1.0), "concurrent": part(10.0)}


def _throughput() -> dict:
    gbps = {"underlay": [12.0, 12.4], "underlay6": [11.0, 11.2], "fan": [9.4, 9.6], "fan6": [9.2, 9.3],
            "flannel": [9.7, 9.9]}
    runs = {v: [{"gbps": g, "round": i + 1, "position": i + 1} for i, g in enumerate(vals)] for v, vals in gbps.items()}
    rows = [{"nodes": n,
             "fan": {"node1": {"routes": 2, "neighbours": 1, "fdb": 0, "tc_filters": 1, "total": 4},
                     "min_total": 4, "max_total": 4},
             "flannel": {"node1": {"routes": n, "neighbours": n - 1, "fdb": n - 1, "tc_filters": 0,
                                   "total": 3 * n - 2}, "min_total": 3 * n - 2, "max_total": 3 * n - 2}}
            for n in (2, 5, 10)]
    return {"benchmark": "throughput", "date": DATE, "machine": MACHINE,
            "method": {"rounds": 2, "seconds_per_run": 1, "lab_sizes": [2, 5, 10]},
            "throughput": {"median_gbps": {v: sum(x) / 2 for v, x in gbps.items()},
                           "min_gbps": {v: min(x) for v, x in gbps.items()},
                           "max_gbps": {v: max(x) for v, x in gbps.items()},
                           "runs": runs,
                           "ratios": {"fan_over_flannel": 0.97, "fan_over_flannel_per_round": [0.97, 0.97],
                                      "fan6_over_fan": 0.97, "fan6_over_fan_per_round": [0.98, 0.97],
                                      "underlay6_over_underlay": 0.91}},
            "entries": {"rows": rows, "fan_totals": [4, 4, 4], "fan_constant": True,
                        "flannel_entries_per_added_node": 3.0}}


def _bridge_scale() -> dict:
    def one(n: int, v: str, wall: float) -> dict:
        broadcast = 0.0 if v == "fan" else float(n - 11)
        return {"add_wall_s": wall, "del_wall_s": wall * 0.8, "add_ms": _stats(wall * 10), "del_ms": _stats(wall * 8),
                "broadcast": {"broadcast_per_resolution": broadcast, "all_frames_per_resolution": broadcast * 1.5},
                "leftover_ports": 0}

    bulk = {str(n): {"reference": one(n, "reference", n / 40), "fan": one(n, "fan", n / 20),
                     "fan-noguard": one(n, "fan-noguard", n / 21)} for n in (20, 50, 100)}
    return {"benchmark": "bridge_scale", "date": DATE, "machine": MACHINE,
            "method": {"sizes": [20, 50, 100], "parallel": 2, "targets": 2}, "bulk": bulk}


def _results_dir(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    results.mkdir()
    for data in (_latency(), _throughput(), _bridge_scale()):
        (results / f"{data['benchmark']}-2026-01-02.json").write_text(json.dumps(data))
    return results


def _render(results: Path, out: Path) -> Path:
    doc = out / "docs" / "benchmarks.md"
    assert bench_run.main(["--render-only", "--results-dir", str(results), "--doc", str(doc)]) == 0
    return doc


def _section(text: str, name: str) -> str:
    start = text.index(f'<a id="{name}"></a>')
    end = text.find('<a id="', start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_render_draws_every_figure_and_embeds_it_under_its_heading(tmp_path, capsys):
    results = _results_dir(tmp_path)
    stale = tmp_path / "a" / "docs" / "img" / "bench-gone-figure.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    doc = _render(results, tmp_path / "a")
    err = capsys.readouterr().err
    assert "failed" not in err and "skipped" not in err, err

    text = doc.read_text()
    img = doc.parent / "img"
    expected = {f"bench-{name}-{key}.png" for name, keys in FIGURES.items() for key in keys}
    assert {p.name for p in img.glob("*.png")} == expected  # the stale one is gone
    for name, keys in FIGURES.items():
        section = _section(text, name)
        heading = re.search(r"^## .*$", section, re.M)
        assert heading and TITLES[name] in heading.group(0)
        for key in keys:
            png = img / f"bench-{name}-{key}.png"
            data = png.read_bytes()
            assert data[:8] == PNG_MAGIC
            assert len(data) > 5000
            link = re.search(rf"^!\[[^\]]+\]\(img/{re.escape(png.name)}\)$", section, re.M)
            assert link, f"{png.name} not embedded in the {name} section"
            assert heading.end() < link.start() < section.index("Measured ")  # right under the heading
    assert "| N | network |" in text and "| path | median Gbit/s |" in text  # the tables are still there

    # Unchanged results give the same bytes.
    again = _render(results, tmp_path / "b")
    assert again.read_text() == text
    for name in expected:
        assert (again.parent / "img" / name).read_bytes() == (img / name).read_bytes()


def test_a_failing_figure_is_left_out_and_the_page_still_renders(tmp_path, monkeypatch, capsys):
    def broken(fig, result):
        raise KeyError("median_gbps")

    monkeypatch.setitem(plots.FIGURES, "throughput", [("gbps", "broken figure", broken)])
    doc = _render(_results_dir(tmp_path), tmp_path)
    err = capsys.readouterr().err
    assert "bench-throughput-gbps.png failed (KeyError" in err
    text = doc.read_text()
    assert "bench-throughput-gbps.png" not in text and not (doc.parent / "img" / "bench-throughput-gbps.png").exists()
    assert "](img/bench-latency-add-del.png)" in text
    assert "| path | median Gbit/s |" in text


def test_without_matplotlib_the_page_has_its_tables_and_one_line_says_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    doc = _render(_results_dir(tmp_path), tmp_path)
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "plots skipped" in line]
    assert len(skipped) == 1 and "matplotlib is not installed" in skipped[0]
    assert "pip install -e '.[bench]'" in skipped[0]
    text = doc.read_text()
    assert "![" not in text and not (doc.parent / "img").exists()
    for name in FIGURES:
        assert TITLES[name] in _section(text, name)
    assert "| N | network |" in text and "| path | median Gbit/s |" in text and "ADD median" in text


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_each_figure_draws_from_a_result_alone(tmp_path, name):
    result = {"latency": _latency, "throughput": _throughput, "bridge_scale": _bridge_scale}[name]()
    drawn = plots.draw(name, result, tmp_path)
    assert [p.name for _caption, p in drawn] == [f"bench-{name}-{key}.png" for key in FIGURES[name]]
    for caption, path in drawn:
        assert caption and path.read_bytes()[:8] == PNG_MAGIC


def test_the_throughput_section_gives_the_ipv6_ratio_and_older_results_still_render():
    from bench import throughput_report

    text = throughput_report.render(_throughput())
    assert "fan over IPv6 / fan over IPv4 (same pods, same run): 0.97" in text
    assert "node ↔ node over the underlay, IPv6 / IPv4: 0.91." in text
    assert ("| round | order | underlay | underlay IPv6 | fan | fan IPv6 | flannel-style | fan / flannel-style "
            "| fan IPv6 / fan |") in text
    assert ("| 1 | underlay → underlay IPv6 → fan → fan IPv6 → flannel-style | 12.0 | 11.0 | 9.40 | 9.20 | 9.70 "
            "| 0.97 | 0.98 |") in text

    older = _throughput()  # a result from before the IPv6 variant
    for key in ("median_gbps", "min_gbps", "max_gbps", "runs"):
        older["throughput"][key].pop("fan6")
        older["throughput"][key].pop("underlay6")
    for key in ("fan6_over_fan", "fan6_over_fan_per_round", "underlay6_over_underlay"):
        older["throughput"]["ratios"].pop(key)
    old_text = throughput_report.render(older)
    assert "IPv6" not in old_text
    assert "| 1 | underlay → fan → flannel-style | 12.0 | 9.40 | 9.70 | 0.97 |" in old_text


def test_the_throughput_section_gives_the_direct_routing_ratios_and_entries():
    from bench import throughput_report

    data = _throughput()
    tp = data["throughput"]
    for variant, values in (("fan_direct", [11.6, 11.8]), ("hostgw", [11.5, 11.5])):
        tp["runs"][variant] = [{"gbps": g, "round": i + 1, "position": 6 + i} for i, g in enumerate(values)]
        tp["median_gbps"][variant] = sum(values) / 2
        tp["min_gbps"][variant], tp["max_gbps"][variant] = min(values), max(values)
    tp["ratios"].update({"fan_direct_over_underlay": 0.96, "fan_direct_over_underlay_per_round": [0.97, 0.95],
                         "fan_direct_over_hostgw": 1.02, "fan_direct_over_hostgw_per_round": [1.01, 1.03],
                         "hostgw_over_underlay": 0.94})
    data["verdict"] = {"direct_underlay_target": 0.95, "direct_underlay_met": True, "direct_hostgw_target": 1.0,
                       "direct_hostgw_met": True}
    for row in data["entries"]["rows"]:
        n = row["nodes"]
        row["fan_direct"] = {"node1": {"total": 4}, "min_total": 4, "max_total": 4}
        row["hostgw"] = {"node1": {"routes": n, "total": n}, "min_total": n, "max_total": n}
        row["fan_direct_per_peer_entries_lab_check"] = {"n1": 0}
    data["entries"].update({"fan_direct_totals": [4, 4, 4], "hostgw_totals": [2, 5, 10]})

    text = throughput_report.render(data)
    assert "fan with direct routing / underlay: 0.96** (per round 0.95 to 0.97); target ≥ 0.95: yes" in text
    assert "Fan direct / host-gw-style: 1.02** (per round 1.01 to 1.03); target ≥ 1.0: yes" in text
    assert "With direct routing the fan holds 4, 4, 4; host-gw-style 2, 5, 10." in text
    assert "| fan with direct routing: pod ↔ pod, unencapsulated within the segment | 11.7 |" in text
    assert "| 10 | 2 | 1 | 0 | 1 | 4 | 10 | 9 | 9 | 0 | 28 | yes | 0 | 4 | 10 | 0 |" in text
