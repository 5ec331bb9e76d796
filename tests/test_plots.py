"""plots.py writes its three pictures from any checkpoint (skipped without matplotlib)."""

import pytest
import torch

pytest.importorskip("matplotlib")

import plots  # noqa: E402
import synthetic as S  # noqa: E402
from data import Batches  # noqa: E402
from model import GPT  # noqa: E402
from tiny import tiny_config  # noqa: E402
from tokenizer import Tokenizer, byte_spec  # noqa: E402


def test_pictures_are_written_with_the_right_grids(tmp_path):
    S.prepare(str(tmp_path / "d"), 128, 8, 4, 3, 2)
    val = Batches(str(tmp_path / "d"), "val", 128)
    torch.manual_seed(0)
    model = GPT(tiny_config(window=8, dense_layers=(0,))).eval()
    plt = plots.plt_module()
    grid = plots.density_heatmap(plt, model, val, tmp_path / "h.png", n_batches=1, batch_size=2)
    assert grid.shape == (1, 2) and (grid == 1).all()  # open gates keep everything
    ids = val.sample(1, torch.Generator().manual_seed(0))[0][0].tolist()
    shade = plots.kept_tokens(plt, model, Tokenizer(byte_spec()), ids, tmp_path / "k.png")
    assert shade.shape == (1, 128)
    rows = plots.tau_sweep(plt, model, val, tmp_path / "s.png", taus=(0.5, 0.999))
    assert rows[0][1] == 1.0 and rows[1][1] == 0.0  # sigmoid(5) = 0.9933: kept at 0.5, dropped at 0.999
    for name in ("h.png", "k.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_tau_sweep_is_two_panels_side_by_side_with_a_legend_for_the_loss():
    plt = plots.plt_module()
    taus, rows = (0.1, 0.5, 0.9), [(0.42, 1.0), (0.41, 0.04), (0.41, 0.03)]
    fig = plots.tau_sweep_figure(plt, taus, rows, plain=0.43)
    left, right = fig.axes  # two panels, no twin axis
    assert left.get_position().x1 < right.get_position().x0  # side by side, not drawn over each other
    assert left.get_xlabel() == right.get_xlabel() == "tau" and "density" in left.get_ylabel()
    assert "loss" in right.get_ylabel() and left.get_title() and right.get_title()
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["SP-KV, hard gates",
                                                                      "plain attention, same weights"]
    assert list(right.lines[0].get_ydata()) == [0.42, 0.41, 0.41] and list(left.lines[0].get_ydata()) == [1.0, 0.04, 0.03]
    plt.close(fig)


def test_kept_tokens_labels_only_kept_tokens_and_explains_the_shade():
    plt = plots.plt_module()
    grid = torch.zeros(2, 200)
    grid[0, [5, 50]] = 1.0
    grid[1, 120] = 0.5
    fig = plots.kept_tokens_figure(plt, grid, [f"t{i}" for i in range(200)])
    ax, bar = fig.axes[0], fig.axes[-1]
    assert ax.get_xlabel() == "token position" and "KV heads" in bar.get_ylabel()  # the colour bar
    top = next(a for a in ax.child_axes)  # the secondary axis with the kept tokens' text
    assert [t.get_text() for t in top.get_xticklabels()] == ["t5", "t50", "t120"]
    assert len(ax.get_xticks()) == 13  # positions every 16th, not every token
    plt.close(fig)


def test_labelled_positions_thin_a_crowd_to_at_most_the_limit():
    grid = torch.ones(1, 300)
    shown = plots.labelled_positions(grid, max_labels=64)
    assert len(shown) <= 64 and shown[0] == 0 and shown == sorted(shown)
    assert plots.labelled_positions(torch.zeros(2, 10)) == []
