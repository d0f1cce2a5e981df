import pytest
import torch

from lightning_modules.optim import adamw_one_cycle


def _rates(total_steps: int, pct_start: float = 0.2) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    configured = adamw_one_cycle([parameter], lr=1e-3, weight_decay=0.0, pct_start=pct_start, total_steps=total_steps)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("total_steps", [1, 2, 3, 5, 10, 100])
def test_every_run_length_gets_a_schedule_that_peaks_at_the_learning_rate(total_steps):
    # 5 steps with pct_start 0.2 is a one-step warm-up, on which plain OneCycleLR divides by zero
    rates = _rates(total_steps)
    assert max(rates) == pytest.approx(1e-3)
    if total_steps >= 4:
        assert rates[0] < 1e-3 / 10 and rates[-1] < rates[len(rates) // 2]  # warm up, then anneal
