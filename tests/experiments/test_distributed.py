"""trainer=gpu / trainer=ddp: which process is the primary, device checks, followers waiting for the primary,
and one real DDP run of dr-distill on two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from experiments.distributed import (
    DeviceRequestError,
    PrimaryStageError,
    check_accelerator,
    check_single_run_for_ddp,
    is_primary_process,
    single_device_overrides,
    wait_for_stage,
)
from experiments.runner import (
    PARITY_FAILURE,
    FinisherFailures,
    RunContext,
    create_context,
    finishing,
    raise_for_failed_finishers,
    run_finisher,
)
from experiments.tracking import RunState
from experiments.train_dr import run_dr_distill
from tests.experiments.helpers import compose_config, mlflow_store, runs_by_name

REPO = Path(__file__).resolve().parents[2]
DDP_ON_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
              "trainer.sync_batchnorm=false"]


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


# ------------------------------------------------------------------------------------------ which process
@pytest.mark.parametrize(("env", "primary"), [
    ({}, True),  # no launcher at all
    ({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"}, True),  # Lightning's rank 0 after launching
    ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, False),  # the child Lightning started
    ({"NODE_RANK": "1", "MASTER_ADDR": "node0"}, False),  # node 1's first process, started by hand
    ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun
    ({"RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, False),
    ({"RANK": "4", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),  # torchrun, second node
    ({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, True),
    ({"SLURM_PROCID": "3", "SLURM_LOCALID": "1"}, False),
    # inside an interactive SLURM allocation Lightning's child inherits SLURM_PROCID=0
    ({"SLURM_PROCID": "0", "LOCAL_RANK": "1", "NODE_RANK": "0"}, False),
    ({"RANK": "", "LOCAL_RANK": " "}, True),  # set but empty: unset
])
def test_only_global_rank_zero_is_primary(env: dict[str, str], primary: bool):
    assert is_primary_process(env) is primary


def test_a_rank_that_is_no_number_is_named():
    with pytest.raises(ValueError, match=r"LOCAL_RANK='one'"):
        is_primary_process({"LOCAL_RANK": "one"})


# ------------------------------------------------------------------------------------------ devices
DDP_STRATEGY = {"_target_": "lightning.pytorch.strategies.DDPStrategy", "find_unused_parameters": False}


@pytest.mark.parametrize(("trainer", "asked"), [
    ({"accelerator": "gpu", "devices": 1}, "trainer=gpu"),
    ({"accelerator": "cuda", "devices": 1}, "trainer=gpu"),
    ({"accelerator": "gpu", "devices": -1, "strategy": DDP_STRATEGY}, "trainer=ddp"),
    ({"accelerator": "auto", "devices": 2, "strategy": "ddp"}, "trainer=ddp"),
])
def test_gpu_trainers_need_cuda(trainer: dict, asked: str):
    with pytest.raises(DeviceRequestError, match=rf"{asked} .*needs a CUDA GPU and torch.cuda.is_available\(\) is "
                                                 r"False.*use trainer=cpu \(the default\)"):
        check_accelerator(trainer, cuda_available=False, device_count=0)


@pytest.mark.parametrize("trainer", [
    {"accelerator": "cpu", "devices": 1},
    {"accelerator": "auto", "devices": 1},  # Lightning picks the CPU itself
    {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "sync_batchnorm": False},  # DDP on CPU processes
    {"accelerator": "cpu", "devices": "auto"},
    {"accelerator": "mps", "devices": 1},  # left to Lightning's own check
])
def test_trainers_without_gpus_pass_on_a_cpu_machine(trainer: dict):
    check_accelerator(trainer, cuda_available=False, device_count=0)


@pytest.mark.parametrize("devices", [1, 4, -1, "auto", "2", [0, 3], "0,3", "1,"])
def test_gpu_requests_this_machine_can_serve(devices):
    check_accelerator({"accelerator": "gpu", "devices": devices, "strategy": DDP_STRATEGY}, True, 4)


@pytest.mark.parametrize(("devices", "message"), [
    (5, r"asks for 5 GPUs, but this machine has 4: use trainer.devices=4"),
    ("8", r"asks for 8 GPUs, but this machine has 4"),
    (0, r"asks for no GPU"),
    ([1, 4], r"names GPU\(s\) \[4\], but this machine has 4 \(indices 0..3\)"),
    ("0,7", r"names GPU\(s\) \[7\]"),
    ("two", r"trainer.devices='two': give a count"),
    (True, r"give a count"),
])
def test_gpu_requests_beyond_this_machine_are_named(devices, message: str):
    with pytest.raises(DeviceRequestError, match=message):
        check_accelerator({"accelerator": "gpu", "devices": devices}, cuda_available=True, device_count=4)


@pytest.mark.parametrize(("trainer", "message"), [
    ({"accelerator": "cpu", "devices": -1}, r"on the CPU, devices counts processes"),
    ({"accelerator": "cpu", "devices": [0, 1]}, r"on the CPU, devices counts processes"),
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp", "sync_batchnorm": True},
     r"SyncBatchNorm runs on GPUs only; add trainer.sync_batchnorm=false"),
    ({"accelerator": "cpu", "devices": 1, "num_nodes": 0}, r"trainer.num_nodes=0"),
])
def test_impossible_cpu_requests_are_named(trainer: dict, message: str):
    with pytest.raises(DeviceRequestError, match=message):
        check_accelerator(trainer, cuda_available=True, device_count=4)


def test_the_composed_trainer_configs(project: Path):
    gpu = compose_config("train_dr", ["trainer=gpu"], project / "out").trainer
    ddp = compose_config("train_dr", ["trainer=ddp"], project / "out").trainer
    assert (gpu.accelerator, gpu.devices, gpu.precision) == ("gpu", 1, "16-mixed")
    assert (ddp.accelerator, ddp.devices, ddp.num_nodes, ddp.sync_batchnorm) == ("gpu", -1, 1, True)
    assert ddp.strategy.find_unused_parameters is False and ddp.use_distributed_sampler is True
    for trainer in (gpu, ddp):
        with pytest.raises(DeviceRequestError, match="torch.cuda.is_available"):
            check_accelerator(trainer, cuda_available=False, device_count=0)
        check_accelerator(trainer, cuda_available=True, device_count=8)
    check_accelerator(compose_config("train_dr", DDP_ON_CPU, project / "out").trainer, False, 0)
    # a paper experiment (its own trainer=gpu) still takes trainer=ddp from the command line
    paper = compose_config("train_dr", ["experiment=dr_distill_paper", "trainer=ddp"], project / "out").trainer
    assert paper.strategy.find_unused_parameters is False and paper.max_epochs == 100


@pytest.mark.parametrize(("devices", "single"), [(-1, 1), (4, 1), ("auto", 1), ([2, 3], [2]), ("1,3", [1])])
def test_the_primary_tests_on_the_first_configured_device(devices, single):
    assert single_device_overrides({"devices": devices, "strategy": DDP_STRATEGY}) == {
        "devices": single, "num_nodes": 1, "strategy": "auto"}


@pytest.mark.parametrize("trainer", ["trainer=gpu", "trainer=ddp"])
def test_entry_point_stops_before_reading_data_without_a_gpu(project: Path, monkeypatch, trainer: str):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, wherever the test runs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    run_dir = project / "outputs" / "dr-distill" / "runs" / "a"
    with pytest.raises(DeviceRequestError, match=r"needs a CUDA GPU.*use trainer=cpu \(the default\)"):
        run_dr_distill(compose_config("train_dr", ["debug=tiny", trainer], run_dir))
    assert not run_dir.exists() and not (project / "mlruns").exists() and not (project / ".cache").exists()


# ------------------------------------------------------------------------------------------ followers
def test_a_follower_reads_the_state_and_writes_nothing(project: Path, monkeypatch):
    run_dir = project / "outputs" / "dr-distill" / "runs" / "a"
    recorded = RunState(run_dir / "run_state.json", "debug=tiny", parent_run_id="parent",
                        stages={"teacher": {"status": "done", "checkpoint": "t.ckpt"}})
    recorded.save()
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = create_context(compose_config("train_dr", ["debug=tiny"], run_dir))
    assert not ctx.primary and ctx.tracker is None
    assert ctx.state.stage_done("teacher") and ctx.state.parent_run_id == "parent"
    assert not (project / "mlruns").exists()
    with pytest.raises(ValueError, match="boom"), finishing(ctx):
        ctx.state.stages["student"] = {"status": "running"}
        raise ValueError("boom")
    assert json.loads((run_dir / "run_state.json").read_text())["stages"] == {
        "teacher": {"status": "done", "checkpoint": "t.ckpt"}}


class _RecordingTracker:
    def __init__(self) -> None:
        self.statuses: list[str] = []

    def finish(self, status: str) -> None:
        self.statuses.append(status)


def test_a_failing_primary_ends_the_followers_wait(tmp_path: Path):
    state = RunState(tmp_path / "run_state.json", "key", stages={"teacher": {"status": "done"}})
    tracker = _RecordingTracker()
    ctx = RunContext(None, tmp_path, tmp_path, "key", [], state, tracker)
    with pytest.raises(ValueError, match="boom"), finishing(ctx):
        state.stages["student"] = {"status": "running"}
        raise ValueError("boom")
    assert tracker.statuses == ["FAILED"]
    assert RunState.load_or_create(state.path, "").stages == {
        "teacher": {"status": "done"}, "student": {"status": "failed", "error": "ValueError: boom"}}
    started = time.monotonic()
    with pytest.raises(PrimaryStageError, match=r"recorded stage 'student' as failed .*ValueError: boom"):
        wait_for_stage(state.path, "student", timeout_s=30, poll_s=0.01)
    assert time.monotonic() - started < 5


def test_a_follower_goes_on_past_a_finisher_that_failed_its_parity_check_on_the_primary(tmp_path: Path):
    failed = {"status": "failed", "failure": PARITY_FAILURE, "error": "Dice of int8 vs fp32 masks 0.9 < 0.98"}
    recorded = RunState(tmp_path / "run_state.json", "key", stages={"qat-prune-8": failed})
    recorded.save()
    ctx = RunContext(None, tmp_path, tmp_path, "key", [], RunState(recorded.path, "key"), tracker=None, primary=False)

    def follow() -> dict:  # what fit_and_test_stage does on a follower once the primary recorded the failure
        return wait_for_stage(recorded.path, "qat-prune-8", timeout_s=30, poll_s=0.01)

    assert run_finisher(ctx, "qat-prune-8", follow) == failed == ctx.state.stages["qat-prune-8"]
    with pytest.raises(FinisherFailures, match="qat-prune-8: Dice of int8 vs fp32 masks 0.9 < 0.98"):
        raise_for_failed_finishers(ctx, ["base-16", "qat-prune-8"])
    # any other failure of the primary still stops the follower
    recorded.stages["qat-prune-8"] = {"status": "failed", "error": "ValueError: boom"}
    recorded.save()
    with pytest.raises(PrimaryStageError, match="boom"):
        run_finisher(ctx, "qat-prune-8", follow)


def test_a_follower_gets_the_result_the_primary_records(tmp_path: Path):
    state = RunState(tmp_path / "run_state.json", "key", stages={"teacher": {"status": "running"}})
    state.save()
    result = {"status": "done", "checkpoint": "best.ckpt", "test": {"test/qwk": 0.5}, "network": "network.pt"}

    def primary_records_the_stage() -> None:
        time.sleep(0.2)
        state.stages["teacher"] = result
        state.save()

    writer = threading.Thread(target=primary_records_the_stage)
    writer.start()
    try:
        assert wait_for_stage(state.path, "teacher", timeout_s=30, poll_s=0.01) == result
    finally:
        writer.join()


def test_a_follower_stops_waiting_at_its_timeout(tmp_path: Path):
    RunState(tmp_path / "run_state.json", "key", stages={"teacher": {"status": "running"}}).save()
    started = time.monotonic()
    with pytest.raises(PrimaryStageError, match=r"waited 0 s .*stage 'teacher'.*status there: 'running'.*"
                                                r"filesystem every node shares"):
        wait_for_stage(tmp_path / "run_state.json", "teacher", timeout_s=0.2, poll_s=0.01)
    assert 0.2 <= time.monotonic() - started < 5
    with pytest.raises(PrimaryStageError, match=r"status there: None"):  # the primary never wrote the file
        wait_for_stage(tmp_path / "missing" / "run_state.json", "teacher", timeout_s=0.05, poll_s=0.01)


def test_a_follower_stops_waiting_when_its_launcher_is_gone(tmp_path: Path):
    RunState(tmp_path / "run_state.json", "key", stages={"teacher": {"status": "running"}}).save()
    answers = iter([True, True, False])
    with pytest.raises(PrimaryStageError, match="the process that started this one has exited"):
        wait_for_stage(tmp_path / "run_state.json", "teacher", timeout_s=30, poll_s=0.01,
                       launcher_alive=lambda: next(answers))


# ------------------------------------------------------------------------------------------ a real DDP run
@pytest.mark.slow
def test_ddp_on_two_cpu_processes_records_one_run(tmp_path: Path):
    """The real entry point, as a user starts it: Lightning starts the second process at the first fit."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env["PROJECT_ROOT"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "experiments.train_dr", "debug=tiny", *DDP_ON_CPU], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]

    run_dirs = list((tmp_path / "outputs" / "dr-distill" / "runs").iterdir())
    assert len(run_dirs) == 1  # the second process worked in the first one's folder
    run_dir = run_dirs[0]
    follower_log = (run_dir / "train_ddp_process_1.log").read_text()
    assert "Stage teacher trained; waiting for the primary" in follower_log
    assert "Stage student trained; waiting for the primary" in follower_log
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["complete"] is True
    assert [state["stages"][stage]["status"] for stage in ("teacher", "student")] == ["done", "done"]
    assert Path(state["stages"]["teacher"]["checkpoint"]).is_file()

    client = mlflow_store(tmp_path)
    runs = runs_by_name(client, "dr-distill")
    parent_name = f"dr-distill[debug=tiny,{','.join(sorted(DDP_ON_CPU))}]"
    assert {name: len(found) for name, found in runs.items()} == {parent_name: 1, "teacher": 1, "student": 1}
    parent = runs[parent_name][0]
    assert parent.info.run_id == state["parent_run_id"] and parent.info.status == "FINISHED"
    assert "student/test/qwk" in parent.data.metrics
    for stage in ("teacher", "student"):
        child = runs[stage][0]
        assert child.info.run_id == state["child_run_ids"][stage] and child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for metric in ("test/qwk", "test/acc", "model/params"):
            assert len(client.get_metric_history(child.info.run_id, metric)) == 1, f"{stage} {metric}"
        assert client.get_run(child.info.run_id).data.metrics["test/qwk"] == state["stages"][stage]["test"]["test/qwk"]


def test_a_sweep_is_refused_with_ddp_but_not_with_one_process():
    # every DDP process would run the command again, i.e. start the whole sweep (and ask Optuna for trials) again
    with pytest.raises(DeviceRequestError, match="hydra.mode=RUN model/baseline=resnet50"):
        check_single_run_for_ddp({"strategy": "ddp"}, multirun=True)
    check_single_run_for_ddp({"strategy": "ddp"}, multirun=False)
    check_single_run_for_ddp({"strategy": "auto"}, multirun=True)
    check_single_run_for_ddp({}, multirun=True)

