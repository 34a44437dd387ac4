"""Pictures of attention layouts for the docs (matplotlib, no display needed)."""

from __future__ import annotations

import numpy as np

from st_keras import layouts as layouts_lib


def save_layout_png(layout: layouts_lib.Layout, path: str, head: int = 0,
                    title: str | None = None) -> str:
  """Renders one head of a layout as a query x key picture.

  Attended token pairs are dark; the block grid is drawn in light lines.
  Uses `layout.to_dense()`, so keep n small (a few hundred tokens).

  Args:
    layout: the `Layout` to draw.
    path: output PNG path.
    head: which head to draw.
    title: figure title; defaults to the layout's name.

  Returns:
    `path`.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not 0 <= head < layout.num_heads:
    raise ValueError(f"head must be in [0, {layout.num_heads}), got {head}")
  mask = layout.to_dense()[head]  # (n, n)
  fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
  ax.imshow(mask, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
  ticks = np.arange(0, layout.seq_len + 1, layout.block_size) - 0.5
  ax.set_xticks(ticks, minor=True)
  ax.set_yticks(ticks, minor=True)
  ax.grid(which="minor", color="#9ecae1", linewidth=0.3)
  ax.tick_params(which="minor", length=0)
  ax.set_xlabel("key position j")
  ax.set_ylabel("query position i")
  ax.set_title(title or f"{layout.name}, head {head}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
