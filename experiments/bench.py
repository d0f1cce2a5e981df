"""``make bench``: CPU latency and size of teacher, student, student + topology and the full pipeline.

Everything is measured in one process, one after the other, at batch 1 with the same thread
count, and every latency is also given as a ratio to the teacher measured in the same run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datamodules.dr import DRDataModule
from datamodules.fundus import read_rgb
from datamodules.topology import image_diagrams
from experiments.runner import create_context, save_resolved_config
from experiments.tracking import standard_tags
from lightning_modules.classifier import StudentDistiller, TeacherClassifier
from lightning_modules.nets.student import build_student_net
from lightning_modules.profiling import (
    count_macs,
    count_parameters,
    measure_latency,
    model_latency,
    state_dict_size_bytes,
)

log = logging.getLogger(__name__)


def _trained_modules(cfg: DictConfig, dm: DRDataModule) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    run_dir = cfg.bench.run_dir
    if run_dir:
        state = json.loads((Path(run_dir) / "run_state.json").read_text())
        teacher = TeacherClassifier.load_from_checkpoint(state["stages"]["teacher"]["checkpoint"], map_location="cpu",
                                                         pretrained="none")
        student = StudentDistiller.load_from_checkpoint(state["stages"]["student"]["checkpoint"], map_location="cpu",
                                                        pretrained="none", teacher_checkpoint=None)
        return teacher.net, student.net, f"trained weights from {run_dir}"
    teacher = instantiate(cfg.model.teacher, pretrained="none", pretrained_path=None)
    distill = {k: v for k, v in OmegaConf.to_container(cfg.distill).items() if k != "teacher_checkpoint"}
    student = instantiate(cfg.model.student, pretrained="none", pretrained_path=None,
                          topo_features=dm.topology_dim, teacher_checkpoint=None, **distill)
    return teacher.net, student.net, "freshly built networks (latency and size do not depend on the weights)"


def benchmark(cfg: DictConfig, dm: DRDataModule) -> pd.DataFrame:
    teacher, student, source = _trained_modules(cfg, dm)
    log.info("Benchmarking %s", source)
    runs, warmup = int(cfg.bench.runs), int(cfg.bench.warmup)
    path = dm.datasets["test"].paths[0]
    image, topo = dm.inference_inputs(path, with_topology=True)
    rows = []

    def add(name: str, net: torch.nn.Module | None, inputs: tuple, latency) -> None:
        rows.append({
            "model": name,
            "params": count_parameters(net) if net is not None else 0,
            "macs": count_macs(net, inputs) if net is not None else 0,
            "size_bytes": state_dict_size_bytes(net) if net is not None else 0,
            "latency_ms_median": latency.median_ms, "latency_ms_min": latency.min_ms,
            "latency_ms_max": latency.max_ms, "runs": latency.runs, "threads": latency.threads,
        })

    add(f"teacher ({cfg.model.teacher.backbone})", teacher, (image,), model_latency(teacher, (image,), runs, warmup))
    # The deployable alternative without the topological branch: the same backbone + CBAM + head.
    cnn_only = build_student_net(cfg.model.student.backbone, num_classes=cfg.model.student.num_classes,
                                 topo_features=0)
    add(f"student CNN+CBAM ({cfg.model.student.backbone})", cnn_only, (image,),
        model_latency(cnn_only, (image,), runs, warmup))
    if student.uses_topology:
        add("student + topological branch", student, (image, topo), model_latency(student, (image, topo), runs, warmup))
        preprocessed = dm.preprocessing(read_rgb(path))
        topo_latency = measure_latency(lambda: dm.imager.transform([image_diagrams(preprocessed, dm.topology)]),
                                       runs=runs, warmup=2)
        add(f"topological features alone ({dm.topology.resolution} px homology)", None, (), topo_latency)

    def pipeline() -> torch.Tensor:
        with torch.inference_mode():
            image, topo = dm.inference_inputs(path, with_topology=student.uses_topology)
            return student(image, topo) if student.uses_topology else student(image)

    student.eval()
    add("full pipeline (decode, preprocess, topology, student)", student, (image, topo) if student.uses_topology
        else (image,), measure_latency(pipeline, runs=int(cfg.bench.pipeline_runs), warmup=2))
    table = pd.DataFrame(rows)
    teacher_ms = table.loc[0, "latency_ms_median"]
    table["latency_vs_teacher"] = table["latency_ms_median"] / teacher_ms
    return table


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    ctx = create_context(cfg)
    dm: DRDataModule = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    table = benchmark(cfg, dm)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = ctx.run_dir / "bench.csv", ctx.run_dir / "bench.md"
    table.to_csv(csv_path, index=False)
    shown = table.assign(size_MB=table["size_bytes"] / 1e6, MMACs=table["macs"] / 1e6)[
        ["model", "params", "MMACs", "size_MB", "latency_ms_median", "latency_ms_min", "latency_ms_max",
         "latency_vs_teacher", "threads"]]
    markdown = shown.to_markdown(index=False, floatfmt=".4g")
    md_path.write_text(markdown + "\n")
    parent = ctx.tracker.start_parent(standard_tags(ctx.project_root, ctx.overrides, dm.fingerprint, dm.is_synthetic))
    ctx.tracker.log_context(parent, {"bench.threads": str(torch.get_num_threads())},
                            [csv_path, md_path, save_resolved_config(cfg, ctx.run_dir / "config.yaml")])
    metrics = {}
    for row in table.itertuples():
        key = row.model.split(" (")[0].replace(" ", "_").replace("+", "plus")
        metrics[f"{key}/latency_ms_median"] = row.latency_ms_median
        metrics[f"{key}/latency_vs_teacher"] = row.latency_vs_teacher
    ctx.tracker.log_metrics(parent, metrics)
    ctx.state.complete = True
    ctx.state.save()
    ctx.tracker.finish("FINISHED")
    print(f"\nCPU batch-1 latency, {torch.get_num_threads()} threads ({md_path}):\n")
    print(markdown)


if __name__ == "__main__":
    main()
