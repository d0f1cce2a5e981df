import numpy as np
import pytest

from datamodules.replay import ReplayBuffer


def test_keeps_only_the_highest_losses_and_the_latest_value_of_each_sample():
    buffer = ReplayBuffer(capacity=3)
    buffer.update([0, 1, 2, 3], [0.1, 0.9, 0.5, 0.7])
    assert set(buffer.losses) == {1, 2, 3}
    buffer.update([1], [0.05])  # sample 1 was learned: its new, low loss counts
    buffer.update([4], [0.6])
    assert buffer.hardest() == [3, 4, 2]


def test_sampling_probabilities_are_proportional_to_the_loss():
    buffer = ReplayBuffer(capacity=10)
    buffer.update([5, 6, 7], [1.0, 3.0, 0.0])
    assert buffer.probabilities() == pytest.approx({5: 0.25, 6: 0.75, 7: 0.0})
    draws = buffer.sample(20_000, np.random.default_rng(0))
    assert set(np.unique(draws)) <= {5, 6}
    assert np.mean(draws == 6) == pytest.approx(0.75, abs=0.02)


def test_small_draws_are_without_replacement():
    buffer = ReplayBuffer(capacity=10)
    buffer.update(range(6), [1.0] * 6)
    assert len(set(buffer.sample(6, np.random.default_rng(1)).tolist())) == 6


def test_all_zero_losses_sample_uniformly_and_empty_buffer_draws_nothing():
    buffer = ReplayBuffer(capacity=4)
    assert buffer.sample(3, np.random.default_rng(0)).size == 0
    buffer.update([1, 2], [0.0, 0.0])
    assert buffer.probabilities() == {1: 0.5, 2: 0.5}


def test_state_round_trip_and_bad_input():
    buffer = ReplayBuffer(capacity=2)
    buffer.update([3, 4], [0.2, 0.4])
    restored = ReplayBuffer(capacity=1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.capacity == 2 and restored.losses == {3: 0.2, 4: 0.4}
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0)
    with pytest.raises(ValueError, match="finite"):
        buffer.update([1], [float("nan")])
