"""The entry points under DDP: which process is the primary one, whether the machine has the devices the trainer
asks for, and how the other processes receive the primary's result of a stage.

With ``strategy=ddp`` Lightning starts local ranks 1..N-1 by running the entry point's command line again (and
torchrun or SLURM start every rank that way), so every process runs the whole experiment from the top. Global
rank 0, the primary, alone writes the run's files and MLflow runs and tests each stage; the followers train with
it and then wait here for what it recorded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: environment variables that hold a rank of this process: global (torchrun / SLURM / LSF), node and local.
#: Lightning's children inherit rank 0's environment, SLURM_PROCID=0 included inside an interactive allocation,
#: and get LOCAL_RANK=N: only a process whose every set rank is 0 is global rank 0.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_RANK")
#: accelerator names Lightning runs on CUDA GPUs (``gpu`` picks CUDA wherever it exists)
CUDA_ACCELERATORS = ("gpu", "cuda")
#: strategies that run one process per device (a ``_target_`` class name or Lightning's registered name)
SINGLE_PROCESS_STRATEGIES = ("auto", "single_device", "SingleDeviceStrategy")
#: a stage's statuses in run_state.json that end a follower's wait
DONE, FAILED = "done", "failed"


class DeviceRequestError(ValueError):
    """The trainer config asks for an accelerator or devices this machine does not have."""


class PrimaryStageError(RuntimeError):
    """The primary process recorded the stage a follower waits for as failed, or stopped recording it."""


def is_primary_process(env: Mapping[str, str]) -> bool:
    """Whether this process is global rank 0 (also with no distributed launcher at all).

    Read once at the start of an entry point, before a Trainer exists: rank 0 itself gets ``LOCAL_RANK=0`` only
    when it starts the other processes of its node.
    """
    for name in RANK_VARIABLES:
        value = env.get(name, "").strip()
        if not value:
            continue
        try:
            rank = int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not a rank (an integer >= 0): unset it, "
                             "or let the launcher (Lightning, torchrun, SLURM) set it") from None
        if rank != 0:
            return False
    return True


def _strategy_name(strategy: Any) -> str:
    if strategy is None:
        return "auto"
    if isinstance(strategy, Mapping):
        return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]
    if isinstance(strategy, str):
        return strategy
    return type(strategy).__name__


def is_multiprocess_strategy(strategy: Any) -> bool:
    """Whether a trainer's ``strategy`` (a name, a ``_target_`` node or an instance) runs several processes."""
    return _strategy_name(strategy) not in SINGLE_PROCESS_STRATEGIES


def _device_list(devices: Any) -> list[int] | None:
    """GPU indices of a ``devices`` value that names them (a list, or a string such as ``"0,1"``); else None."""
    if isinstance(devices, str):
        text = devices.strip()
        if "," not in text:
            return None
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise DeviceRequestError(f"trainer.devices={devices!r}: give GPU indices such as '0,1'") from None
    if isinstance(devices, Sequence):
        try:
            return [int(index) for index in devices]
        except (TypeError, ValueError):
            raise DeviceRequestError(f"trainer.devices={list(devices)!r}: GPU indices are integers, e.g. [0, 1]") from None
    return None


def _device_count(devices: Any) -> int | None:
    """A ``devices`` count: an int, or a string of one; -1 and ``"auto"`` are None (every device)."""
    if isinstance(devices, bool):
        raise DeviceRequestError(f"trainer.devices={devices!r}: give a count, -1, 'auto' or GPU indices")
    if isinstance(devices, str):
        text = devices.strip().lower()
        if text == "auto":
            return None
        try:
            devices = int(text)
        except ValueError:
            raise DeviceRequestError(f"trainer.devices={devices!r}: give a count, -1, 'auto' or GPU indices "
                                     "such as [0, 1]") from None
    if not isinstance(devices, int):
        raise DeviceRequestError(f"trainer.devices={devices!r}: give a count, -1, 'auto' or GPU indices")
    return None if devices == -1 else devices


def _check_gpu_devices(devices: Any, device_count: int) -> None:
    # By hand rather than Lightning's device parser: that one queries the real machine (so this check could not
    # be tested without GPUs) and its messages do not name the config keys to change.
    indices = _device_list(devices)
    if indices is not None:
        if not indices:
            raise DeviceRequestError(f"trainer.devices={devices!r} names no GPU: give indices such as [0, 1]")
        missing = [index for index in indices if not 0 <= index < device_count]
        if missing:
            raise DeviceRequestError(f"trainer.devices={list(indices)} names GPU(s) {missing}, but this machine has "
                                     f"{device_count} (indices 0..{device_count - 1}): name GPUs it has, or use "
                                     "trainer.devices=-1 for every GPU")
        return
    count = _device_count(devices)
    if count is not None and count < 1:
        raise DeviceRequestError(f"trainer.devices={devices!r} asks for no GPU: give a count >= 1, -1 (every GPU) "
                                 "or GPU indices such as [0, 1]")
    if count is not None and count > device_count:
        raise DeviceRequestError(f"trainer.devices={devices!r} asks for {count} GPUs, but this machine has "
                                 f"{device_count}: use trainer.devices={device_count}, or -1 for every GPU")


def _check_cpu_devices(devices: Any) -> None:
    if _device_list(devices) is not None:
        raise DeviceRequestError(f"trainer.accelerator=cpu with trainer.devices={devices!r}: on the CPU, devices "
                                 "counts processes; give a number, e.g. trainer.devices=2")
    if isinstance(devices, str) and devices.strip().lower() == "auto":
        return
    count = _device_count(devices)
    if count is None or count < 1:
        raise DeviceRequestError(f"trainer.accelerator=cpu with trainer.devices={devices!r}: on the CPU, devices "
                                 "counts processes (-1, every device, means something only for GPUs); give a "
                                 "number >= 1, e.g. trainer.devices=2")


def check_accelerator(trainer_cfg: Mapping[str, Any], cuda_available: bool, device_count: int) -> None:
    """Raise :class:`DeviceRequestError` when the trainer config asks for GPUs this machine does not have.

    CUDA is needed by ``accelerator: gpu`` / ``cuda`` (``trainer=gpu``, ``trainer=ddp``) and by ``auto`` with a
    multi-process strategy (which would otherwise quietly start CPU processes). ``devices`` may be a count, -1 or
    ``"auto"`` (every GPU), or GPU indices; ``num_nodes`` must be >= 1. DDP on the CPU
    (``trainer=ddp trainer.accelerator=cpu trainer.devices=2 trainer.sync_batchnorm=false``) is allowed: it is
    how DDP is tested without GPUs.
    Apple's ``mps`` (one device, no DDP) and other accelerators are left to Lightning's own check.
    """
    accelerator = str(trainer_cfg.get("accelerator", "auto")).lower()
    strategy = trainer_cfg.get("strategy", "auto")
    devices = trainer_cfg.get("devices", "auto")
    num_nodes = trainer_cfg.get("num_nodes", 1)
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise DeviceRequestError(f"trainer.num_nodes={num_nodes!r}: give the number of machines (>= 1)")
    needs_cuda = accelerator in CUDA_ACCELERATORS or (accelerator == "auto" and is_multiprocess_strategy(strategy))
    if needs_cuda:
        if not cuda_available or device_count < 1:
            asked = "trainer=ddp" if is_multiprocess_strategy(strategy) else "trainer=gpu"
            raise DeviceRequestError(
                f"{asked} (trainer.accelerator={accelerator}) needs a CUDA GPU and torch.cuda.is_available() is False "
                "on this machine: use trainer=cpu (the default), or install a CUDA build of torch on a machine "
                "with an NVIDIA GPU and driver (nvidia-smi lists them). DDP without GPUs: trainer=ddp "
                "trainer.accelerator=cpu trainer.devices=2 trainer.precision=32-true trainer.sync_batchnorm=false. "
                "Apple silicon: "
                "trainer.accelerator=mps (one device, no DDP)")
        _check_gpu_devices(devices, device_count)
    elif accelerator == "cpu":
        _check_cpu_devices(devices)
        if trainer_cfg.get("sync_batchnorm") and is_multiprocess_strategy(strategy):
            raise DeviceRequestError("trainer.sync_batchnorm=true with trainer.accelerator=cpu: PyTorch's "
                                     "SyncBatchNorm runs on GPUs only; add trainer.sync_batchnorm=false")


def single_device_overrides(trainer_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Trainer arguments that turn the configured trainer into a one-device one: where the primary process tests.

    Lightning recommends testing on one device: a DistributedSampler pads the test split with repeated images,
    and the diagnostics callbacks collect per-image outputs of one process. The device is the first one the
    config names, the one global rank 0 trained on.
    """
    indices = _device_list(trainer_cfg.get("devices", "auto"))
    return {"devices": indices[:1] if indices else 1, "num_nodes": 1, "strategy": "auto"}


def leave_process_group() -> None:
    """Destroy torch.distributed's process group after a distributed fit (every process calls this).

    The primary then tests alone: a torchmetrics metric syncs over a live process group when it computes, and
    would wait forever for the followers. The next fit's strategy creates a new group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _recorded_stage(state_file: Path, stage: str) -> dict[str, Any]:
    try:
        return dict(json.loads(state_file.read_text()).get("stages", {}).get(stage, {}))
    except (OSError, json.JSONDecodeError):
        return {}  # not written yet (or, on a network filesystem, caught mid-write): read it again


def wait_for_stage(state_file: Path, stage: str, timeout_s: float, poll_s: float = 2.0,
                   launcher_alive: Callable[[], bool] | None = None) -> dict[str, Any]:
    """A follower's wait for the primary to test ``stage`` and record it in ``state_file`` (run_state.json):
    returns the recorded result (checkpoint, test metrics, the stage's files).

    Raises :class:`PrimaryStageError` when the primary recorded the stage as failed, when ``launcher_alive()``
    turns False (the process that started this one is gone), or after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        record = _recorded_stage(state_file, stage)
        status = record.get("status")
        if status == DONE:
            return record
        if status == FAILED:
            raise PrimaryStageError(f"the primary process (global rank 0) recorded stage {stage!r} as failed in "
                                    f"{state_file}: {record.get('error', 'no error recorded')}. Its log has the "
                                    "cause; fix it, then rerun with resume=true")
        if launcher_alive is not None and not launcher_alive():
            raise PrimaryStageError(f"waiting for stage {stage!r} in {state_file}: the process that started this one "
                                    "has exited, so the primary process will not record it; rerun with resume=true")
        if time.monotonic() >= deadline:
            raise PrimaryStageError(
                f"waited {timeout_s:.0f} s for the primary process (global rank 0) to record stage {stage!r} as "
                f"done in {state_file} (its status there: {status!r}). Is the primary still "
                f"running (its log), and is {state_file.parent} on a filesystem every node shares?")
        time.sleep(poll_s)


def check_single_run_for_ddp(trainer_cfg: Mapping[str, Any], multirun: bool) -> None:
    """A multi-process strategy cannot serve a sweep (``-m``, ``experiment=dr_baselines``, ``hparams_search``):
    Lightning starts the other processes by running the same command again, so each would start the whole sweep
    again, and (Optuna) ask the study for trials of its own."""
    if multirun and is_multiprocess_strategy(trainer_cfg.get("strategy")):
        raise DeviceRequestError(
            f"trainer.strategy={_strategy_name(trainer_cfg.get('strategy'))} runs one process per device, and each "
            "would start this sweep again: run one configuration per command with DDP (add hydra.mode=RUN and "
            "pick one value, e.g. hydra.mode=RUN model/baseline=resnet50), or sweep with trainer=gpu")

