"""The demo's figure: tick labels on its log axes stay readable (no two labels overlap)."""
import math

import pytest

pytest.importorskip("matplotlib")

from liera.apps import demo  # noqa: E402
from liera.apps.training import ArmResult  # noqa: E402


def visible_labels(axis, renderer):
    """Window extents of the tick labels (major and minor) that are drawn with text inside the axis range."""
    lo, hi = sorted(axis.get_view_interval())
    boxes = []
    for minor in (False, True):
        for tick in (axis.get_minor_ticks() if minor else axis.get_major_ticks()):
            if tick.label1.get_visible() and tick.label1.get_text() and lo <= tick.get_loc() <= hi:
                boxes.append((tick.label1.get_text(), tick.label1.get_window_extent(renderer)))
    return boxes


@pytest.mark.parametrize("losses", [
    [0.9 - 0.6 * j / 199 for j in range(200)],                 # within one decade: minor ticks at 0.3 ... 0.9
    [2.3 * math.exp(-j / 40) + 0.01 for j in range(200)],     # over two decades
])
def test_log_axes_labels_do_not_overlap(losses):
    results = [ArmResult(method=m, trainable_params=n, test_accuracy=a, train_time_s=1.0, peak_memory_mb=1.0, lr=1e-3,
                         epochs=1, losses=[v * (1 + 0.1 * i) for v in losses])
               for i, (m, n, a) in enumerate([("lora", 269_538, 0.83), ("liera-rms", 269_538, 0.835),
                                              ("linear-probe", 12_810, 0.77)])]
    fig = demo.figure(results, {"task": "fashion-1k", "r": 8})
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = visible_labels(axis, renderer)
            for i, (text_a, a) in enumerate(boxes):
                for text_b, b in boxes[i + 1:]:
                    assert not a.overlaps(b), f"tick labels {text_a!r} and {text_b!r} overlap"
    assert len(visible_labels(fig.axes[1].yaxis, renderer)) >= 2  # the loss axis still says where it is
