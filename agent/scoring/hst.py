"""river HalfSpaceTrees over per-window features, for streams without a model."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from agent.scoring.base import F32, StateError

__all__ = ["HalfSpaceDetector"]


class HalfSpaceDetector:
    """river's HalfSpaceTrees over each window's last value, mean, spread and last step.

    river is imported when the detector first scores (importing river.anomaly costs
    ~80 MB RSS and about a second). Its state is the trees' masses: the trees
    themselves are rebuilt from the seed, which draws the same splits.
    """

    KEY: ClassVar[str] = "hst"
    scaled = True
    learns = True

    def __init__(self, fields: tuple[str, ...], *, n_trees: int = 10, height: int = 8,
                 window_size: int = 250, seed: int = 0) -> None:
        self.fields = fields
        self.n_trees = n_trees
        self.height = height
        self.window_size = window_size
        self.seed = seed
        self._hst: Any = None

    def _get(self) -> Any:
        if self._hst is None:
            from river import anomaly  # noqa: PLC0415  (lazily: ~80 MB RSS)

            self._hst = anomaly.HalfSpaceTrees(n_trees=self.n_trees, height=self.height,
                                               window_size=self.window_size, seed=self.seed)
        return self._hst

    def features(self, windows: F32) -> list[dict[str, float]]:
        """Features of scaled windows, squashed into HalfSpaceTrees' [0, 1] box."""
        last = windows[:, -1, :]
        mean = windows.mean(axis=1)
        std = windows.std(axis=1)
        step = windows[:, -1, :] - windows[:, -2, :] if windows.shape[1] > 1 else last * 0
        parts = {"last": last, "mean": mean, "std": std, "step": step}
        squashed = {k: 0.5 + 0.5 * np.tanh(v / 4.0) for k, v in parts.items()}
        return [{f"{f}.{k}": float(v[i, j]) for k, v in squashed.items()
                 for j, f in enumerate(self.fields)} for i in range(windows.shape[0])]

    def fit(self, windows: F32) -> None:
        """The warm-up windows fill the trees' reference window."""
        self.learn(windows)

    def score(self, windows: F32) -> F32:
        hst = self._get()
        return np.array([hst.score_one(x) for x in self.features(windows)], dtype=np.float32)

    def learn(self, windows: F32) -> None:
        hst = self._get()
        for x in self.features(windows):
            hst.learn_one(x)

    def _nodes(self) -> list[list[Any]]:
        return list(self._get()._tree_nodes)

    def to_state(self) -> dict[str, Any]:
        hst = self._get()
        if not hst.trees:
            return {"built": False}
        nodes = self._nodes()
        return {"built": True, "counter": int(hst.counter),
                "first_window": bool(hst._first_window),
                "l_mass": np.array([[n.l_mass for n in t] for t in nodes], np.float64),
                "r_mass": np.array([[n.r_mass for n in t] for t in nodes], np.float64)}

    def load_state(self, state: dict[str, Any]) -> None:
        self._hst = None
        if not state.get("built"):
            return
        hst = self._get()
        # Build the trees exactly as learning would (same seed, same feature names),
        # then put the saved masses on them.
        zero = np.zeros((1, 2, len(self.fields)), np.float32)
        hst.learn_one(self.features(zero)[0])
        nodes = self._nodes()
        lm, rm = np.asarray(state["l_mass"]), np.asarray(state["r_mass"])
        if lm.shape != (len(nodes), len(nodes[0])) or rm.shape != lm.shape:
            raise StateError(f"HalfSpaceTrees state has shape {lm.shape}, the trees have "
                             f"{(len(nodes), len(nodes[0]))}")
        for t, tree in enumerate(nodes):
            for i, node in enumerate(tree):
                node.l_mass, node.r_mass = float(lm[t, i]), float(rm[t, i])
        hst.counter = int(state["counter"])
        hst._first_window = bool(state["first_window"])
