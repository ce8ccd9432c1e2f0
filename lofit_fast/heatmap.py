"""`plot_head_scores`: a layers x heads heatmap of a step-1 head ranking, the top-K heads outlined.

Rendered with matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves the
caller's matplotlib state alone. The PNG is written atomically (`lofit_fast.io.atomic_path`).
"""

import math

from .io import atomic_path
from .ranking import HeadRanking, resolve_k


def _score_grid(ranking: HeadRanking) -> list[list[float]]:
    """scores[layer][head], NaN where the ranking has no score."""
    grid = [[math.nan] * ranking.num_heads for _ in range(ranking.num_layers)]
    for layer, head, score in ranking.ranking:
        if score is not None:
            grid[layer][head] = float(score)
    return grid


def _title(ranking: HeadRanking, selected: list, has_scores: bool) -> str:
    total = ranking.num_layers * ranking.num_heads
    k_text = f"top-{len(selected)} of {total} heads outlined" if selected else "no heads selected"
    if not has_scores:
        return (f"{ranking.localizer} ranking: no scores, only the selected heads are shown\n"
                f"{len(selected)} of {total} heads selected")
    return f"{_score_name(ranking)} (localizer: {ranking.localizer})\n{k_text}"


def _score_name(ranking: HeadRanking) -> str:
    """What a ranking's scores are: step 1's scale norms, or the probes' validation accuracy."""
    return "probe validation accuracy" if ranking.localizer == "probe" else "step-1 head scores ||A_lh||_2"


def plot_head_scores(ranking: HeadRanking, path, selected_k=None) -> None:
    """Write a PNG heatmap of `ranking`'s scores to `path`: rows are layers, columns heads.

    selected_k: the top-K heads to outline (a count, or a fraction of all heads as in `tune`); None
    outlines none. A ranking without scores (the random baseline) shows only the selected heads.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    total = ranking.num_layers * ranking.num_heads
    selected = ranking.top(resolve_k(selected_k, total)) if selected_k is not None else []
    grid = _score_grid(ranking)
    has_scores = any(not math.isnan(value) for row in grid for value in row)
    if not has_scores:
        # Nothing to colour by: mark the chosen heads instead.
        grid = [[0.0] * ranking.num_heads for _ in range(ranking.num_layers)]
        for layer, head in selected:
            grid[layer][head] = 1.0

    width = min(16.0, 2.5 + 0.4 * ranking.num_heads)
    height = min(12.0, 2.0 + 0.4 * ranking.num_layers)
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid, cmap="viridis" if has_scores else "Greys", aspect="auto", origin="lower",
                        interpolation="nearest", vmin=0.0 if not has_scores else None)
    for layer, head in selected:
        axes.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(ranking.num_heads))
    axes.set_yticks(range(ranking.num_layers))
    axes.tick_params(labelsize=7 if ranking.num_heads > 24 else 9)
    axes.set_title(_title(ranking, selected, has_scores), fontsize=10)
    if has_scores:
        figure.colorbar(image, ax=axes, label=_score_name(ranking))
    with atomic_path(path) as temporary:
        # The temporary name ends in .tmp, so the format is named explicitly.
        figure.savefig(temporary, format="png", dpi=100)
