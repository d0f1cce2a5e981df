"""The optimiser and schedule every LightningModule of the suite uses: AdamW with a one-cycle learning rate."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw_one_cycle(parameters: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, pct_start: float,
                    total_steps: int) -> dict:
    """AdamW + OneCycleLR stepped per batch, in the form ``configure_optimizers`` returns.

    OneCycleLR divides by the warm-up length in steps minus one, so a warm-up of exactly one step
    (e.g. pct_start 0.2 of 5 steps in a debug run) raises ZeroDivisionError inside PyTorch; such runs
    get a warm-up of two steps, and runs too short for any schedule (under 4 steps) a constant rate.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    total_steps = max(int(total_steps), 1)
    if total_steps < 4:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        warmup_steps = pct_start * total_steps
        if abs(warmup_steps - 1.0) < 1e-9 or warmup_steps < 2.0:
            pct_start = 2.0 / total_steps
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                        pct_start=pct_start)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
