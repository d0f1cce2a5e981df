import pytest
import torch
from torch import nn

from lightning_modules.profiling import (
    count_macs,
    count_parameters,
    measure_latency,
    model_latency,
    state_dict_size_bytes,
)


def test_params_and_macs_of_a_known_network():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert count_parameters(net) == 3 * 8 * 9 + 128 * 10 + 10
    # conv: 8 out x 16 positions x 27 MACs; linear: 128 x 10
    assert count_macs(net, (torch.randn(1, 3, 4, 4),)) == 8 * 16 * 27 + 128 * 10


def test_state_dict_size_grows_with_parameters():
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)
    assert state_dict_size_bytes(large) >= 10100 * 4 > state_dict_size_bytes(small) >= 110 * 4


def test_latency_statistics_are_ordered_and_restore_training_mode():
    net = nn.Linear(16, 4).train()
    stats = model_latency(net, (torch.randn(1, 16),), runs=5, warmup=1)
    assert 0 < stats.min_ms <= stats.median_ms <= stats.max_ms and stats.runs == 5
    assert stats.fps == pytest.approx(1000 / stats.median_ms)
    assert net.training
    calls = []
    measure_latency(lambda: calls.append(1), runs=3, warmup=2)
    assert len(calls) == 5
    with pytest.raises(ValueError):
        measure_latency(lambda: None, runs=0)
