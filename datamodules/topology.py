"""Topological features of a fundus image: cubical persistence -> persistence images.

The grey-level image is treated as a sublevel-set filtration on a cubical complex (gudhi). Dark
structures (vessels, haemorrhages, microaneurysms) are born early as connected components (H0);
loops of vessels and rings of exudates show up in H1. Each diagram becomes a fixed-size
persistence image (gudhi.representations), a vector an MLP can consume.

The persistence-image range and the feature scale are *fitted on the training split only*:
fitting them on the first batch or on all data would leak test statistics into the features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import gudhi
import numpy as np
from gudhi.representations import PersistenceImage

HOMOLOGY_DIMENSIONS = (0, 1)


@dataclass(frozen=True)
class TopologyConfig:
    """Where and how homology is computed; part of the diagram cache key."""

    resolution: int = 64  # side of the grey image homology is computed on (cost grows ~ resolution^2)
    min_persistence: float = 0.02  # drop near-diagonal points: JPEG noise, not anatomy
    image_resolution: int = 32  # persistence image side, per homology dimension
    bandwidth_fraction: float = 0.05  # Gaussian bandwidth as a fraction of the fitted range

    @property
    def key(self) -> str:
        return f"r{self.resolution}-p{self.min_persistence:g}"

    @property
    def feature_dim(self) -> int:
        return len(HOMOLOGY_DIMENSIONS) * self.image_resolution**2


def grey_for_homology(image: np.ndarray, resolution: int) -> np.ndarray:
    """RGB uint8 -> float grey in [0, 1] at ``resolution``; the green channel carries most lesion contrast."""
    green = image[..., 1] if image.ndim == 3 else image
    small = cv2.resize(green, (resolution, resolution), interpolation=cv2.INTER_AREA)
    return small.astype(np.float64) / 255.0


def persistence_diagrams(grey: np.ndarray, min_persistence: float = 0.0) -> list[np.ndarray]:
    """H0 and H1 sublevel persistence diagrams of a 2-D array, as (n, 2) float32 arrays of (birth, death).

    The one essential H0 class never dies; its death is set to the image maximum so that it stays
    a finite, comparable point (its birth, the darkest value, is informative).
    """
    complex_ = gudhi.CubicalComplex(top_dimensional_cells=grey)
    complex_.compute_persistence(homology_coeff_field=2, min_persistence=min_persistence)
    ceiling = float(grey.max())
    diagrams = []
    for dim in HOMOLOGY_DIMENSIONS:
        intervals = np.asarray(complex_.persistence_intervals_in_dimension(dim), dtype=np.float64).reshape(-1, 2)
        intervals[np.isinf(intervals[:, 1]), 1] = ceiling
        keep = intervals[:, 1] - intervals[:, 0] >= min_persistence
        diagrams.append(intervals[keep].astype(np.float32))
    return diagrams


def image_diagrams(image: np.ndarray, config: TopologyConfig) -> list[np.ndarray]:
    """Persistence diagrams of a preprocessed RGB fundus image."""
    return persistence_diagrams(grey_for_homology(image, config.resolution), config.min_persistence)


def pack_diagrams(diagrams: list[np.ndarray]) -> np.ndarray:
    """Store several diagrams in one (n, 3) array (dimension, birth, death), for a single .npy cache file."""
    rows = [np.column_stack([np.full(len(d), dim, np.float32), d]) for dim, d in zip(HOMOLOGY_DIMENSIONS, diagrams)]
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, 3), np.float32)


def unpack_diagrams(packed: np.ndarray) -> list[np.ndarray]:
    return [packed[packed[:, 0] == dim, 1:3].astype(np.float64) for dim in HOMOLOGY_DIMENSIONS]


def _persistence_weight(point: np.ndarray) -> float:
    # gudhi passes (birth, persistence): weighting by persistence makes short-lived noise fade out
    # smoothly, the standard choice of Adams et al. (2017) that keeps the map stable.
    return float(point[1])


@dataclass
class PersistenceImager:
    """Diagrams -> one flat, scaled feature vector (H0 image then H1 image). Fit on training diagrams only."""

    config: TopologyConfig
    images: list[PersistenceImage] = field(default_factory=list)
    scale: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self.scale is not None

    def fit(self, diagrams: list[list[np.ndarray]]) -> PersistenceImager:
        """Fit the image range per homology dimension and a per-dimension feature scale."""
        if not diagrams:
            raise ValueError("cannot fit persistence images on an empty training split")
        self.images = []
        resolution = [self.config.image_resolution] * 2
        for index, _ in enumerate(HOMOLOGY_DIMENSIONS):
            per_image = [d[index] for d in diagrams]
            probe = PersistenceImage(resolution=resolution, weight=_persistence_weight).fit(per_image)
            x_min, x_max, y_min, y_max = (float(v) for v in probe.im_range_fixed_)
            if not np.all(np.isfinite([x_min, x_max, y_min, y_max])):
                x_min, x_max, y_min, y_max = 0.0, 1.0, 0.0, 1.0  # no points at all in this dimension
            span = max(x_max - x_min, y_max - y_min, 1e-6)
            # pad the range by one bandwidth so points on the border are not cut in half
            bandwidth = self.config.bandwidth_fraction * span
            im_range = [x_min - bandwidth, x_max + bandwidth, y_min - bandwidth, y_max + bandwidth]
            image = PersistenceImage(bandwidth=bandwidth, weight=_persistence_weight, resolution=resolution,
                                     im_range=im_range)
            self.images.append(image.fit(per_image))
        self.scale = None
        raw = self._raw(diagrams)
        # One scale per homology dimension (99th percentile of its pixels): keeps H0 and H1 comparable
        # for the MLP without whitening away the spatial structure of the image.
        pixels = self.config.image_resolution**2
        scale = np.ones(raw.shape[1], np.float32)
        for index in range(len(HOMOLOGY_DIMENSIONS)):
            block = raw[:, index * pixels:(index + 1) * pixels]
            scale[index * pixels:(index + 1) * pixels] = max(float(np.percentile(block, 99)), 1e-8)
        self.scale = scale
        return self

    def _raw(self, diagrams: list[list[np.ndarray]]) -> np.ndarray:
        blocks = [image.transform([d[index] for d in diagrams]) for index, image in enumerate(self.images)]
        return np.concatenate(blocks, axis=1).astype(np.float32)

    def transform(self, diagrams: list[list[np.ndarray]]) -> np.ndarray:
        """(n_images, feature_dim) float32 features."""
        if not self.fitted:
            raise RuntimeError("PersistenceImager.transform called before fit (fit on the training split)")
        if not diagrams:
            return np.zeros((0, self.config.feature_dim), np.float32)
        return self._raw(diagrams) / self.scale

    def state_dict(self) -> dict:
        """Plain values, enough to rebuild the fitted imager at inference time."""
        if not self.fitted:
            raise RuntimeError("PersistenceImager is not fitted")
        return {
            "config": self.config.__dict__.copy(),
            "im_ranges": [list(map(float, image.im_range_fixed_)) for image in self.images],
            "bandwidths": [float(image.bandwidth) for image in self.images],
            "scale": self.scale.tolist(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> PersistenceImager:
        config = TopologyConfig(**state["config"])
        imager = cls(config)
        resolution = [config.image_resolution] * 2
        for im_range, bandwidth in zip(state["im_ranges"], state["bandwidths"]):
            image = PersistenceImage(bandwidth=bandwidth, weight=_persistence_weight, resolution=resolution,
                                     im_range=im_range)
            imager.images.append(image.fit([np.zeros((0, 2))]))
        imager.scale = np.asarray(state["scale"], np.float32)
        return imager
