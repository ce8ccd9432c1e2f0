"""Head rankings: which heads LoFiT adapts, in order (`HeadRanking`), and where they come from.

    ranking = HeadRanking.load("out/select/ranking.json")    # written by select_heads / `lofit select`
    heads = ranking.top(32)                                   # or a fraction of all heads: ranking.top(0.03)
    baseline = random_ranking(model, seed=0)                  # the paper's random-heads baseline

Step 1 (`lofit_fast.training.select_heads`) ranks heads by the norm of their learned scales ("lofit"), the probing
localizer (`lofit_fast.probing`) by a linear probe's accuracy ("probe"). This module imports no trainer: the
heatmap, the probes and the PEFT-style config read rankings without it.
"""

import json
import random
from dataclasses import dataclass, field

from torch import nn

from .io import atomic_write_text
from .patch import attention_shape

LOCALIZERS = ("lofit", "random", "probe")


@dataclass
class HeadRanking:
    """Every head of the model, most important first: `ranking[i] = (layer, head, score)`."""

    ranking: list
    num_layers: int
    num_heads: int
    localizer: str = "lofit"
    settings: dict = field(default_factory=dict)

    def top(self, k) -> list:
        """The first K (layer, head) pairs; K is a count, or a fraction (0, 1) of all heads."""
        return [(layer, head) for layer, head, _ in self.ranking[:resolve_k(k, len(self.ranking))]]

    def save(self, path) -> None:
        # allow_nan=False: strict JSON, which every reader accepts (a NaN score is refused here, not written).
        text = json.dumps({"localizer": self.localizer, "num_layers": self.num_layers,
                           "num_heads": self.num_heads, "settings": self.settings,
                           "ranking": [[layer, head, score] for layer, head, score in self.ranking]}, indent=1,
                          allow_nan=False)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path) -> "HeadRanking":
        try:
            with open(path) as file:
                data = json.load(file)
            ranking = [(int(layer), int(head), None if score is None else float(score))
                       for layer, head, score in data["ranking"]]
            return cls(ranking=ranking, num_layers=int(data["num_layers"]), num_heads=int(data["num_heads"]),
                       localizer=data.get("localizer", "lofit"), settings=data.get("settings", {}))
        except FileNotFoundError:
            raise FileNotFoundError(f"no head ranking at {path}; run `lofit select` (or select_heads) first") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid head ranking ({type(error).__name__}: {error}); expected JSON "
                             f"with num_layers, num_heads and ranking [[layer, head, score], ...]") from None


def resolve_k(k, total_heads: int) -> int:
    """K as a count (int >= 1) or as a fraction of all heads (float in (0, 1))."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a head count or a fraction of all heads, not {k!r}")
    if isinstance(k, float) and 0 < k < 1:
        return max(1, round(k * total_heads))
    if k != int(k) or not 1 <= k <= total_heads:
        raise ValueError(f"k={k!r}: give a count between 1 and {total_heads} or a fraction in (0, 1)")
    return int(k)


def random_ranking(model: nn.Module, seed: int = 0) -> HeadRanking:
    """The paper's random-heads baseline: every head in a seeded random order, with no score."""
    shape = attention_shape(model)
    heads = [(layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)]
    random.Random(seed).shuffle(heads)
    return HeadRanking([(layer, head, None) for layer, head in heads], shape.num_layers, shape.num_heads,
                       localizer="random", settings={"seed": seed})
