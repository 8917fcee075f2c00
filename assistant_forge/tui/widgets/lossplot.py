"""A small loss plot made of block characters: no plotting dependency, fits any width."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

BLOCKS = " ▁▂▃▄▅▆▇█"


def bucket(values: list[float], width: int) -> list[float]:
    """Down-sample to at most `width` points by averaging consecutive buckets."""
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        a, b = i * len(values) // width, (i + 1) * len(values) // width
        chunk = values[a : max(b, a + 1)]
        out.append(sum(chunk) / len(chunk))
    return out


def render_plot(values: list[float], width: int, height: int) -> list[str]:
    """Rows of a column chart, top row first; each cell has 8 levels."""
    if not values or width < 1 or height < 1:
        return [" " * max(width, 0)] * max(height, 0)
    pts = bucket(values, width)
    lo, hi = min(pts), max(pts)
    span = (hi - lo) or 1.0
    levels = [round((v - lo) / span * (height * 8 - 1)) + 1 for v in pts]  # 1..height*8: always visible
    rows = []
    for r in range(height - 1, -1, -1):
        row = "".join(BLOCKS[max(0, min(8, lv - r * 8))] for lv in levels)
        rows.append(row.ljust(width))
    return rows


class LossPlot(Widget):
    """Loss per logged step, with the range and the latest value on the left."""

    DEFAULT_CSS = "LossPlot { height: 6; }"
    values: reactive[tuple[float, ...]] = reactive(tuple, layout=False)

    def extend(self, losses: list[float]) -> None:
        if losses:
            self.values = (*self.values, *losses)

    def reset(self) -> None:
        self.values = ()

    def render(self) -> Text:
        width, height = self.size.width, self.size.height
        label_w = 9
        vals = list(self.values)
        if not vals:
            return Text("loss: waiting for the first logged step…", style="dim")
        rows = render_plot(vals, max(1, width - label_w), height)
        lo, hi = min(vals), max(vals)
        labels = {0: f"{hi:8.3f} ", height - 1: f"{lo:8.3f} "}
        if height > 2:
            labels[height // 2] = f"now{vals[-1]:5.2f} "[:label_w]
        text = Text()
        for i, row in enumerate(rows):
            text.append(labels.get(i, " " * label_w).rjust(label_w), style="dim")
            text.append(row, style="green")
            if i < len(rows) - 1:
                text.append("\n")
        return text
