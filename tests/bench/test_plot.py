"""bench.plot draws P3's curves from a results file: one line per panel through every size, the targets, and a clear
error for a file without a curve."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

from bench import plot

SVG = "{http://www.w3.org/2000/svg}"


def _size(nodes: int, full: float, event: float, rss: float) -> dict:
    return {"nodes": nodes, "pods_per_node": 250, "layout": "scattered", "full_model_cpu_s": full / 2,
            "full_pass_cpu_s": full / 2, "events_ms": {"remote pod added": [event], "remote pod deleted": [event]},
            "rss_peak_events_mb": rss}


def _results(*sizes: dict) -> dict:
    batch = dict(sizes[-1], layout="batch16")
    return {"benchmarks": {"P3": {"rows": [{"raw": [*sizes, batch]}]}}}


def test_every_panel_has_a_point_per_size_and_its_target(tmp_path) -> None:  # type: ignore[no-untyped-def]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results(_size(5000, 5.9, 0.41, 279.0), _size(50, 0.05, 0.33, 33.0),
                                           _size(500, 0.6, 0.38, 60.0))))
    output = tmp_path / "p3.svg"

    assert plot.main([str(results), str(output)]) == 0

    root = ElementTree.fromstring(output.read_text())
    lines = root.findall(f"{SVG}polyline")
    assert len(lines) == 3 and all(len(line.get("points", "").split()) == 3 for line in lines)
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert {"target 10", "target 5", "target 300"} <= set(texts)
    assert {"5.9", "0.41", "279"} <= set(texts) and texts.count("5000") == 3
    xs = [float(point.split(",")[0]) for point in lines[0].get("points", "").split()]
    assert xs == sorted(xs)  # sizes drawn left to right, whatever their order in the file


def test_a_file_without_a_curve_is_a_one_line_error(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results(_size(50, 0.05, 0.3, 30.0))))
    assert plot.main([str(results), str(tmp_path / "p3.svg")]) == 1
    assert capsys.readouterr().err.strip().endswith("no curve to draw")
    assert not (tmp_path / "p3.svg").exists()
