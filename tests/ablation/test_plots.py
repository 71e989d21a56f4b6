"""What the ablation's plots show (ablation/plots.py), read back from the matplotlib
figures on small fake runs: each line's points are the runs' numbers, worked by hand
where the plot transforms them (the MaxVio moving mean, the load heatmap's ratios, the
Pareto families in knob order, hollow markers for dominated points)."""

import matplotlib.colors
import matplotlib.figure
import numpy as np
import pytest

from deepseek_jax.ablation import plots


@pytest.fixture
def figures(monkeypatch):
  """The figures the plot functions save (kept, not written: the data is the point)."""
  saved = []
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                      lambda fig, path, **kw: saved.append((fig, path)))
  return saved


def _run(val, vio):
  """A fake run: training records every step (maxvio_mean from `vio`), an evaluation
  every 3 steps (val_loss from `val`)."""
  records = []
  for step, v in enumerate(vio):
    records.append({"step": step, "loss": 9.0 - step, "ce": 8.0, "maxvio_mean": v})
    if step % 3 == 2 and val:
      records.append({"step": step, "val_loss": val.pop(0)})
  return {"workdir": "fake", "config": {}, "records": records}


def _runs():
  return {"aux_seed1": _run([5.0, 4.0, 3.5], [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]),
          "aux_seed2": _run([5.1, 4.2, 3.4], [1.0, 0.5, 2.0, 0.25, 4.0, 0.125, 8.0, 1.0, 2.0]),
          "bias_seed1": _run([4.9], [0.3, 0.2, 0.1])}   # shorter than the MaxVio window


def _lines(fig):
  ax, = fig.axes
  return [(list(l.get_xdata()), list(l.get_ydata()), matplotlib.colors.to_hex(l.get_color()))
          for l in ax.get_lines()]


def test_val_loss_plot_draws_each_runs_evaluations_with_one_color_per_strategy(
    figures, tmp_path):
  """Evaluations at steps 2, 5, 8 are plotted at steps 3, 6, 9 (steps done); seeds of a
  strategy share a color and one legend entry."""
  plots.plot_val_loss(_runs(), str(tmp_path / "val.png"))
  (fig, path), = figures
  assert path.endswith("val.png")
  lines = _lines(fig)
  assert [(x, y) for x, y, _ in lines] == [([3, 6, 9], [5.0, 4.0, 3.5]),
                                           ([3, 6, 9], [5.1, 4.2, 3.4]),
                                           ([3], [4.9])]
  colors = [c for _, _, c in lines]
  assert colors[0] == colors[1] != colors[2]
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["aux", "bias"]


def test_maxvio_plot_draws_the_moving_mean_at_its_last_step_and_the_raw_curve(
    figures, tmp_path):
  """window 4: the smoothed point at step s (steps done) is the mean of MaxVio over steps
  s-3..s, so the smoothed curve starts at step 4; beside it the raw curve, faint, in the
  same color. A run shorter than the window is drawn unsmoothed."""
  runs = _runs()
  plots.plot_maxvio_batch(runs, str(tmp_path / "vio.png"), window=4)
  (fig, _), = figures
  lines = _lines(fig)
  assert len(lines) == 6 and fig.axes[0].get_yscale() == "log"
  for i, name in enumerate(runs):
    raw = [r["maxvio_mean"] for r in runs[name]["records"] if "maxvio_mean" in r]
    smooth_x, smooth_y, color = lines[2 * i]
    raw_x, raw_y, raw_color = lines[2 * i + 1]
    assert raw_x == list(range(1, len(raw) + 1)) and raw_y == raw and raw_color == color
    if len(raw) < 4:
      assert (smooth_x, smooth_y) == (raw_x, raw_y)
      continue
    assert smooth_x == list(range(4, len(raw) + 1))
    assert smooth_y == pytest.approx([sum(raw[s - 4:s]) / 4 for s in smooth_x])
  # aux_seed2 by hand: its first window 1.0, 0.5, 2.0, 0.25 -> 0.9375.
  assert lines[2][1][0] == pytest.approx(0.9375)


def test_load_heatmap_shows_each_layers_load_over_its_own_mean(figures, tmp_path):
  """Rows: the main model's MoE layers only (the MTP block's row is left out); each
  expert's validation load over its layer's mean, so 1 is balanced whatever the layer's
  token count."""
  summary = {"val_load": [[1, 1, 2, 4], [10, 30, 30, 30], [5, 5, 5, 5]],
             "maxvio_global": 0.75}
  plots.plot_load_heatmap("bias", summary, 2, str(tmp_path / "load.png"))
  (fig, _), = figures
  image, = fig.axes[0].get_images()
  np.testing.assert_allclose(image.get_array(), [[0.5, 0.5, 1.0, 2.0],
                                                 [0.4, 1.2, 1.2, 1.2]])
  assert image.get_clim() == (0.0, 2.0)
  assert "MaxVio_global 0.750" in fig.axes[0].get_title()


def _point(name, family, knob, loss, vio, dominated=(), ci=float("nan")):
  return {"name": name, "family": family, "knob": knob, "n": 1, "val_loss": loss,
          "maxvio_global": vio, "val_loss_ci95": ci, "maxvio_global_ci95": ci,
          "dominated_by": list(dominated), "within_noise": []}


def test_pareto_plot_joins_each_family_in_knob_order_and_hollows_dominated_points(
    figures, tmp_path):
  """The aux family's line runs through its points in alpha order (given shuffled),
  x = MaxVio_global, y = loss; every point is a marker, filled unless dominated; a
  point far above the best loss opens a zoom panel on the points within 0.05 nats."""
  points = [_point("aux_1e-3", "aux", 1e-3, 3.28, 0.20),
            _point("aux_1e-2", "aux", 1e-2, 3.40, 0.05),
            _point("aux_1e-4", "aux", 1e-4, 3.31, 0.60, dominated=["aux_1e-3", "bias"]),
            _point("bias", "bias", 1e-3, 3.29, 0.04),
            _point("none", "none", 0.0, 3.90, 2.00, dominated=["bias"])]
  plots.plot_pareto(points, str(tmp_path / "pareto.png"), title="sigmoid gate")
  (fig, _), = figures
  assert len(fig.axes) == 2                       # the 3.90 point opens the zoom
  for ax in fig.axes:
    family_lines = {l.get_label(): l for l in ax.get_lines()
                    if not l.get_label().startswith("_")}
    aux = family_lines["aux loss (alpha)"]
    # alpha 1e-4, 1e-3, 1e-2 (neither the loss's order nor MaxVio's)
    assert list(aux.get_xdata()) == [0.60, 0.20, 0.05]
    assert list(aux.get_ydata()) == [3.31, 3.28, 3.40]
    assert aux.get_linestyle() == "-"
    markers = {(float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])):
               c.lines[0].get_markerfacecolor() for c in ax.containers}
    assert set(markers) == {(p["maxvio_global"], p["val_loss"]) for p in points}
    hollow = {xy for xy, face in markers.items() if face == "white"}
    assert hollow == {(0.60, 3.31), (2.00, 3.90)}
    assert ax.get_xscale() == "log"
  lo, hi = fig.axes[1].get_ylim()
  assert (lo, hi) == pytest.approx((3.28 - 0.005, 3.31 + 0.005))
  assert fig.axes[0].get_title().startswith("sigmoid gate: ")
