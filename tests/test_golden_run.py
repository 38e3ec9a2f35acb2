"""The recorded run (tests/golden_run.py) still gives the recorded bits."""

import json

import golden_run
import pytest
import torch


def test_recorded_run_is_bit_identical():
    golden = json.loads(golden_run.GOLDEN.read_text())
    env = golden["environment"]
    here = golden_run.environment()
    if (here["torch"], here["cpu_capability"], here["cpu"]) != (env["torch"], env["cpu_capability"], env.get("cpu")):
        pytest.skip(f"recorded on {env}, this machine is {here}: float bits are not comparable")
    assert golden_run.record() == golden["runs"]
    assert torch.get_num_threads() == here["threads"]  # record() restores the thread count
