import numpy as np
import pytest

from datamodules.synthetic import render_fundus
from datamodules.topology import (
    PersistenceImager,
    TopologyConfig,
    image_diagrams,
    pack_diagrams,
    persistence_diagrams,
    unpack_diagrams,
)


def test_two_dark_blobs_give_two_h0_components_and_a_ring_one_h1_loop():
    grey = np.ones((32, 32))
    grey[5:9, 5:9] = 0.1
    grey[20:25, 20:25] = 0.3
    h0, h1 = persistence_diagrams(grey, min_persistence=0.05)
    assert len(h0) == 2  # the essential class (born 0.1) and the blob born at 0.3, dying at 1.0
    np.testing.assert_allclose(sorted(h0[:, 0]), [0.1, 0.3], atol=1e-6)
    assert len(h1) == 0
    ring = np.ones((32, 32))
    ring[8:24, 8:24] = 0.2
    ring[12:20, 12:20] = 0.9
    _, h1 = persistence_diagrams(ring, min_persistence=0.05)
    assert len(h1) == 1 and h1[0] == pytest.approx([0.2, 0.9], abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_diagrams_are_invariant_to_90_degree_rotation(k):
    image = render_fundus(3, size=128, seed=7).image
    config = TopologyConfig(resolution=64)
    original = image_diagrams(image, config)
    rotated = image_diagrams(np.ascontiguousarray(np.rot90(image, k)), config)
    for a, b in zip(original, rotated):
        np.testing.assert_allclose(np.sort(a, axis=0), np.sort(b, axis=0), atol=1e-6)


def test_persistence_image_shape_and_fit_on_training_diagrams_only():
    config = TopologyConfig(resolution=32, image_resolution=16)
    train = [image_diagrams(render_fundus(g, size=96, seed=s).image, config) for s, g in enumerate([0, 2, 4, 1])]
    imager = PersistenceImager(config).fit(train)
    features = imager.transform(train)
    assert features.shape == (4, 2 * 16 * 16) == (4, config.feature_dim)
    assert np.isfinite(features).all() and features.max() > 0
    # a diagram far outside the training range contributes (almost) nothing: the range is not refitted
    outlier = [[np.array([[5.0, 6.0]]), np.array([[5.0, 6.0]])]]
    assert imager.transform(outlier).max() < 1e-6


def test_imager_state_dict_round_trip_and_unfitted_error():
    config = TopologyConfig(resolution=32, image_resolution=8)
    diagrams = [image_diagrams(render_fundus(g, size=96, seed=g).image, config) for g in range(5)]
    with pytest.raises(RuntimeError):
        PersistenceImager(config).transform(diagrams)
    imager = PersistenceImager(config).fit(diagrams)
    restored = PersistenceImager.from_state_dict(imager.state_dict())
    np.testing.assert_allclose(restored.transform(diagrams), imager.transform(diagrams), rtol=1e-6)


def test_pack_unpack_round_trip():
    diagrams = [np.array([[0.1, 0.5], [0.2, 0.9]]), np.array([[0.3, 0.4]])]
    for a, b in zip(unpack_diagrams(pack_diagrams(diagrams)), diagrams):
        np.testing.assert_allclose(a, b, atol=1e-7)
