"""The eval chart (issue 28): every bar carries its value; a score of 0 is visible; a missing one says n/a."""

from __future__ import annotations


def test_chart_labels_every_bar_and_shows_zeros(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.image import imread

    from qtulu.evals.report import bar_chart, chart_figure

    results = {"results": {"base": {"a": {"score": 0.0}, "b": {"score": 0.5}},
                           "tuned": {"a": {"score": 0.962}, "b": {"score": None}}},
               "versions": {"a": "1", "b": "1"}}
    fig = chart_figure(results)
    ax = fig.axes[0]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}
    assert bars["base"][1] == 50.0 and abs(bars["tuned"][0] - 96.2) < 1e-9
    assert 0 < bars["base"][0] <= 1.0  # 0: a sliver on the axis, not an empty slot
    assert bars["tuned"][1] == 0.0  # missing: no bar at all, and its label says so
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["0.0", "50.0", "96.2", "n/a"]
    assert ax.get_ylim()[1] > 100  # room above a full bar for its label
    plt.close(fig)
    # the saved chart is that figure: the zero bar's colour (C0) appears right above the x axis
    path = bar_chart(results, tmp_path / "results.png")
    fig = chart_figure(results)
    fig.canvas.draw()
    ax = fig.axes[0]
    zero = ax.containers[0].patches[0]
    (x0, y0), (x1, _) = ax.transData.transform([(zero.get_x(), 0), (zero.get_x() + zero.get_width(), 0)])
    img = imread(path)
    scale = img.shape[0] / fig.canvas.get_width_height()[1]
    row = int(round((fig.canvas.get_width_height()[1] - y0) * scale)) - 2  # two pixels above the axis
    blue = [int(v * 255) for v in matplotlib.colors.to_rgb("C0")]
    span = img[row, int(x0 * scale) + 2:int(x1 * scale) - 2, :3]
    assert (abs(span * 255 - blue).max(axis=1) < 8).mean() > 0.8, span[:3]
    plt.close(fig)
