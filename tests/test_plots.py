"""Comparison plots read the marl-eval JSON our runs write."""

import json

import numpy as np
import pytest

from utils.logging import MarlEvalJson
from utils.plots import curves, parse_label, plot_comparison


def test_comparison_reads_every_algorithm_and_seed(tmp_path):
    path = str(tmp_path / "results.json")
    for algorithm, offset in (("mappo", 0.0), ("a2po", 1.0)):
        log = MarlEvalJson(path, "lbf", "8x8", algorithm, seeds=[0, 1])
        for k in range(3):
            log.add(k, 100 * (k + 1), {"mean_episode_return": np.array([k + offset, k + offset + 0.5])}, 1.0)
        log.add_absolute({"mean_episode_return": np.array([9.0, 10.0])})
        log.write()
    found = curves(json.load(open(path)), "lbf", "8x8", "mean_episode_return")
    np.testing.assert_array_equal(found["mappo"][0], [100, 200, 300])
    np.testing.assert_array_equal(found["a2po"][1], [[1.0, 1.5], [2.0, 2.5], [3.0, 3.5]])
    lines = plot_comparison(path, "lbf", "8x8", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert any(line.startswith("mappo: final mean_episode_return 2.250") and "absolute metric 9.500" in line
               for line in lines), lines
    with pytest.raises(SystemExit, match="lbf/8x8"):
        curves(json.load(open(path)), "rware", "tiny-2ag", "mean_episode_return")


def test_both_sharing_variants_of_one_system_share_a_file_and_a_colour(tmp_path, monkeypatch):
    path = str(tmp_path / "results.json")
    for algorithm, offset in (("ff_a2po_shared", 0.0), ("ff_a2po_separate", 1.0), ("ff_mappo_shared", 2.0),
                              ("ff_mappo", 3.0)):
        log = MarlEvalJson(path, "lbf", "8x8", algorithm, seeds=[0])
        log.add(0, 100, {"mean_episode_return": np.array([offset])}, 1.0)
        log.write()
    figures = []
    monkeypatch.setattr("utils.plots.save_figure", lambda fig, out: figures.append(fig))
    lines = plot_comparison(path, "lbf", "8x8", str(tmp_path / "plot.png"))
    assert sorted(line.split(":")[0] for line in lines) == ["a2po (separate)", "a2po (shared)", "ff_mappo",
                                                           "mappo (shared)"]
    plotted = {line.get_label().split(" (1 seeds)")[0]: line for line in figures[0].axes[0].get_lines()}
    assert plotted["a2po (shared)"].get_color() == plotted["a2po (separate)"].get_color()
    assert plotted["a2po (shared)"].get_color() != plotted["mappo (shared)"].get_color()
    assert (plotted["a2po (shared)"].get_linestyle(), plotted["a2po (separate)"].get_linestyle()) == ("-", "--")
    assert plotted["ff_mappo"].get_color() != plotted["mappo (shared)"].get_color()  # Mava's name: its own run


def test_parse_label():
    assert parse_label("rec_mappo_separate") == ("rec_mappo_*", "separate", "rec_mappo (separate)")
    assert parse_label("mappo") == ("mappo", None, "mappo")
    assert parse_label("ff_a2po_shared[clip_eps=0.1,adaptive_clip_c=0.5]") == (
        "ff_a2po_*[clip_eps=0.1,adaptive_clip_c=0.5]", "shared", "a2po (shared) [clip_eps=0.1,adaptive_clip_c=0.5]")
