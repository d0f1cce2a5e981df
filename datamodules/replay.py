"""The hard-example replay buffer: the highest-loss training samples, drawn in proportion to their loss."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class ReplayBuffer:
    """Keeps the ``capacity`` training samples with the highest recent loss.

    Each sample's loss is its latest observed value (a sample the network has learned drops out once
    its loss falls below the others'). ``sample`` draws with probability proportional to the loss, so
    the hardest cases come back most often without the easy-but-still-kept ones vanishing entirely.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity={capacity}: the replay buffer needs room for at least one sample")
        self.capacity = int(capacity)
        self.losses: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.losses)

    def update(self, indices: Iterable[int], losses: Iterable[float]) -> None:
        """Record the latest loss of each sample, then keep only the ``capacity`` highest."""
        for index, loss in zip(indices, losses, strict=True):
            loss = float(loss)
            if not np.isfinite(loss) or loss < 0:
                raise ValueError(f"sample {int(index)}: loss {loss} is not a finite non-negative number")
            self.losses[int(index)] = loss
        if len(self.losses) > self.capacity:
            kept = sorted(self.losses.items(), key=lambda item: item[1], reverse=True)[: self.capacity]
            self.losses = dict(kept)

    def probabilities(self) -> dict[int, float]:
        """Each held sample's chance of being drawn: its loss over the buffer's total (uniform if all are 0)."""
        if not self.losses:
            return {}
        indices = list(self.losses)
        losses = np.asarray([self.losses[i] for i in indices], dtype=np.float64)
        total = losses.sum()
        weights = losses / total if total > 0 else np.full(len(losses), 1.0 / len(losses))
        return dict(zip(indices, weights.tolist()))

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` sample indices drawn by loss; without replacement while the buffer holds enough."""
        if not self.losses:
            return np.zeros(0, dtype=np.int64)
        probabilities = self.probabilities()
        indices = np.fromiter(probabilities, dtype=np.int64)
        weights = np.fromiter(probabilities.values(), dtype=np.float64)
        # numpy refuses to draw more distinct items than have non-zero weight
        distinct = count <= np.count_nonzero(weights)
        return rng.choice(indices, size=count, replace=not distinct, p=weights)

    def hardest(self) -> list[int]:
        """Held sample indices, hardest first."""
        return [i for i, _ in sorted(self.losses.items(), key=lambda item: item[1], reverse=True)]

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "losses": {str(k): v for k, v in self.losses.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.losses = {int(k): float(v) for k, v in state["losses"].items()}
