"""Plain helpers of the entry points' shared glue."""

from __future__ import annotations

from experiments.stages import run_key_as_overrides, split_run_key


def test_run_keys_split_at_top_level_commas_only():
    key = "chain.finishers=[qat,share],data=disc_folder,model.x={a: 1, b: 2},seed=7"
    assert split_run_key(key) == {"chain.finishers": "[qat,share]", "data": "disc_folder",
                                  "model.x": "{a: 1, b: 2}", "seed": "7"}
    assert split_run_key("(defaults)") == {}
    assert run_key_as_overrides("chain.finishers=[qat,share],seed=7") == "chain.finishers=[qat,share] seed=7"
