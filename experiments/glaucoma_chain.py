"""Hydra entry point of ``make glaucoma-iterations``: optic-disc segmentation compressed base by base.

    python -m experiments.glaucoma_chain                                     # synthetic data, CPU-sized
    python -m experiments.glaucoma_chain data=disc_folder data.root=/data/drions-db
    python -m experiments.glaucoma_chain chain.bases=[64,32,16] chain.arms=[prune]
    python -m experiments.glaucoma_chain resume=true                        # continue an interrupted chain
    python -m experiments.glaucoma_chain retest=true resume=outputs/glaucoma-iterations/runs/<time>  # no training
    python -m experiments.glaucoma_chain chain.finishers=[qat,share] chain.finish_after=[prune-16]
    python -m experiments.glaucoma_chain experiment=disc_transformer        # base-64 against a transformer

Iteration 1 trains the first base until its validation Dice is sufficient; the prune arm then prunes
the previous network by 50% and fine-tunes it, base after base; the distillation arm trains fresh
networks of the smaller bases from iteration 1's soft masks. Finishers (``chain.finishers``) then fine-tune
copies of chosen stages with int8 quantization-aware training (an int8 ONNX model) or k-means weight sharing
(a packed weight file); their ``model/size_bytes`` is that deployable file's size, and a QAT stage's
``model/latency_ms_*`` is its int8 model's in ONNX Runtime. Comparison stages (``chain.compare``: names of
``model.compare`` entries, each a segmenter config) train another architecture on the same data, split and
metrics after the arms, e.g. the transformer of ``experiment=disc_transformer``. Each stage is a child MLflow
run of one parent run; the parent gets the summary table and the liminal point.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from hydra.utils import instantiate
from lightning import Callback
from omegaconf import DictConfig

from compression.export import quiet_onnx_tool_logs
from datamodules.optic_disc import DiscDataModule
from experiments.chain_summary import (
    BASE_ARM,
    COMPARE_ARM,
    FINISHERS,
    ChainStage,
    describe_comparisons,
    describe_failures,
    describe_liminal,
    liminal_points,
    plan_chain,
    summary_table,
)
from experiments.config_checks import build_each_or_raise, check_disc_config
from experiments.runner import (
    RunContext,
    build_callbacks,
    check_retest,
    exit_on_user_errors,
    finishing,
    fit_and_test_stage,
    raise_for_failed_finishers,
    retest_stage,
    run_finisher,
    start_invocation,
)
from lightning_modules.nets.networks import VGG_UNET, save_network
from lightning_modules.segmenter import DiscSegmenter

log = logging.getLogger(__name__)

NETWORK_FILE = "network.pt"


#: DropoutToggle's off_epochs for a stage that never turns dropout back on
_FOREVER = 10**9
#: A finisher starts from a network that is already sufficient: it fine-tunes its configured epochs (weight
#: sharing reclusters between them) instead of stopping after the first, and still reports epochs and time.
_FINISHER_OVERRIDES = {"train_until_sufficient": {"target": math.inf}}


def _kd_arguments(cfg: DictConfig) -> dict[str, float]:
    """Every stage's segmenter carries the chain's KD settings (used only on batches a teacher annotated)."""
    return {"kd_alpha": cfg.chain.kd.alpha, "kd_temperature": cfg.chain.kd.temperature}


def _compared_models(cfg: DictConfig) -> dict[str, DictConfig]:
    """``model.compare`` (name -> segmenter config); the chain's own configs have none unless an experiment
    adds it (``- /model/segmenter@model.compare.<name>: <config>`` in its defaults)."""
    return dict(cfg.model.get("compare") or {})


def _check_models(cfg: DictConfig, names: list[str]) -> None:
    """Before anything starts: the chain compresses a VGGUNet (pruning and the finishers know no other), and
    every ``chain.compare`` name has its segmenter config in ``model.compare``."""
    architecture = cfg.model.segmenter.get("architecture", VGG_UNET)
    if architecture != VGG_UNET:
        raise ValueError(f"model.segmenter.architecture={architecture}: the chain's bases, arms and "
                         f"finishers compress the VGG16-style network ({VGG_UNET}); train another architecture "
                         "beside it as a comparison stage instead, e.g. experiment=disc_transformer")
    known = _compared_models(cfg)
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(
            f"chain.compare names {missing}, but model.compare has {sorted(known) or 'no entries'}: add each "
            "one's segmenter config to the experiment's defaults (`- /model/segmenter@model.compare.<name>: "
            "<config>`, see experiment=disc_transformer), or on the command line "
            "`+model/segmenter@model.compare.transformer=transformer`")
    size = int(cfg.data.image_size)
    for name in names:
        # a transformer needs sides divisible by its coarsest stride (32 for pvt_v2), the VGG only by 16: say so
        # now, not after iteration 1 has trained
        multiple = getattr(instantiate(known[name], **_kd_arguments(cfg)).net, "input_multiple", 1)
        if size % multiple:
            raise ValueError(f"data.image_size={size}: the comparison model {name!r} needs image sides divisible "
                             f"by {multiple}; use e.g. data.image_size={-(-size // multiple) * multiple}")


def _segmenter_config(cfg: DictConfig, stage: ChainStage) -> DictConfig:
    """The stage's segmenter config: its ``model.compare`` entry for a comparison, else model.segmenter."""
    return _compared_models(cfg)[stage.model] if stage.arm == COMPARE_ARM else cfg.model.segmenter


def _stage_tags(stage: ChainStage) -> dict[str, str]:
    # a comparison has no VGG base: "-", which make report reads as none (not a digit)
    return {"arm": stage.arm, "base": "-" if stage.base is None else str(stage.base)}


def _stage_module(cfg: DictConfig, stage: ChainStage, results: dict[str, dict[str, Any]],
                  trial: bool = False) -> DiscSegmenter:
    """The stage's module; ``trial`` builds one with the same arguments but a fresh network of the stage's base
    in place of its source network (which only the earlier stages produce): see ``_build_every_stage``."""
    chain = cfg.chain
    kd = _kd_arguments(cfg)
    source = {"base": stage.base} if trial else {"network_path": results.get(stage.source, {}).get("network")}
    if stage.arm == COMPARE_ARM:
        # another architecture, built as its config says (fresh, or from its own pretrained encoder)
        return instantiate(_segmenter_config(cfg, stage), **kd)
    if stage.arm == BASE_ARM:
        return instantiate(cfg.model.segmenter, base=stage.base, **kd)
    if stage.arm == "prune":
        # starts from the previous iteration's network; the StructuredPruning callback halves it
        return instantiate(cfg.model.segmenter, **source, vgg16_weights=None, lr=chain.finetune.lr,
                           pct_start=chain.finetune.pct_start, **kd)
    if stage.arm in FINISHERS:
        # a copy of a trained network, fine-tuned gently: it is already good, only the rounding is new
        tune = chain[stage.arm]
        return instantiate(cfg.model.segmenter, **source, vgg16_weights=None, lr=tune.lr, pct_start=tune.pct_start,
                           **kd)
    # a fresh, smaller network: ImageNet VGG16 weights only fit base 64
    return instantiate(cfg.model.segmenter, base=stage.base, vgg16_weights=None, **kd)


def _stage_callbacks(cfg: DictConfig, stage: ChainStage, results: dict[str, dict[str, Any]],
                     stage_dir: Path) -> list[Callback]:
    """The stage's own compression callbacks, in the order they must act on a batch."""
    chain = cfg.chain
    callbacks: list[Callback] = []
    if stage.arm == "prune":
        callbacks.append(instantiate(chain.callbacks.pruning, ratio=stage.prune_ratio))
        callbacks.append(instantiate(chain.callbacks.dropout_toggle))
    elif stage.arm == "kd" and stage.source in results:  # a trial build (no teacher yet) goes without it
        callbacks.append(instantiate(chain.callbacks.distillation, teacher_path=results[stage.source]["network"]))
    elif stage.arm in FINISHERS:
        # dropout stays off while the weights learn their rounding (see QuantizationAwareTraining's measurements)
        callbacks.append(instantiate(chain.callbacks.dropout_toggle, off_epochs=_FOREVER))
        finisher = chain.callbacks.qat if stage.arm == "qat" else chain.callbacks.weight_sharing
        callbacks.append(instantiate(finisher, output_dir=str(stage_dir)))
    return callbacks


def _build_every_stage(cfg: DictConfig, ctx: RunContext, stages: list[ChainStage]) -> None:
    """Build each unfinished stage's module and callbacks once, and drop them, before the first stage trains: an
    argument a class does not take or refuses fails in seconds, not after iteration 1 has trained. Comparison
    models were built by ``_check_models``; a stage that starts from an earlier stage's network is tried on a
    fresh network of its base."""
    def build(stage: ChainStage, folder: Path) -> None:
        _stage_module(cfg, stage, {}, trial=True)
        _stage_callbacks(cfg, stage, {}, folder)
        build_callbacks(cfg.callbacks, folder, _FINISHER_OVERRIDES if stage.arm in FINISHERS else None)

    build_each_or_raise({stage.name: partial(build, stage) for stage in stages
                         if not ctx.state.stage_done(stage.name) and stage.arm != COMPARE_ARM})


def _trainer_overrides(cfg: DictConfig, stage: ChainStage) -> dict[str, Any]:
    epochs = cfg.chain.max_epochs.get(stage.arm)
    return {} if epochs is None else {"max_epochs": int(epochs)}


def _restore_hard_cases(ctx: RunContext, dm: DiscDataModule, first: ChainStage,
                        results: dict[str, dict[str, Any]]) -> None:
    """Data without its own hard-case set gets iteration 1's replay buffer as one (see HardExampleReplay);
    every later stage, also after a resume, is measured on that same set. Under DDP the other processes take
    rank 0's set (their own buffers saw other shards of the data)."""
    ids = results.get(first.name, {}).get("hard_cases")
    if ids and (not ctx.primary or not dm.has_hard_cases):
        dm.set_hard_cases(ids, source=f"the hard-example replay buffer of {first.name}")


def run_glaucoma_chain(cfg: DictConfig) -> float | None:
    """Run (or resume) the chain; returns the last stage's best validation Dice (for sweepers)."""
    check_disc_config(cfg)  # types and ranges of the settings, before anything is read or started
    compare = list(cfg.chain.get("compare") or [])
    stages = plan_chain(list(cfg.chain.bases), list(cfg.chain.arms), list(cfg.chain.get("finishers") or []),
                        list(cfg.chain.get("finish_after") or []), compare)
    _check_models(cfg, compare)
    check_retest(cfg, [stage.name for stage in stages])
    run = start_invocation(cfg, preflight=lambda ctx, dm: _build_every_stage(cfg, ctx, stages))
    ctx, dm = run.ctx, run.datamodule
    log.info("Chain of %d stages: %s", len(stages), ", ".join(s.name for s in stages))
    results = ctx.state.stages
    best_val = None
    with finishing(ctx):
        for stage in stages:
            _restore_hard_cases(ctx, dm, stages[0], results)
            if ctx.state.stage_done(stage.name) and cfg.retest and stage.arm not in FINISHERS:
                _retest_stage(ctx, cfg, stage, dm, run.tags)
            elif ctx.state.stage_done(stage.name):
                log.info("Stage %s already finished in %s: skipping it", stage.name, ctx.run_dir)
            elif stage.arm in FINISHERS:
                # a finisher whose file fails its parity check fails alone: recorded, and reported at the end
                run_finisher(ctx, stage.name, partial(_run_stage, ctx, cfg, stage, dm, run.files, run.tags))
            else:
                _run_stage(ctx, cfg, stage, dm, run.files, run.tags)
            best_val = results[stage.name].get("best_val")
        if ctx.primary:  # under DDP rank 0 alone writes the summary and talks to MLflow
            _log_summary(ctx, run.parent_run_id, summary_table(stages, results), float(cfg.chain.liminal_tolerance))
        raise_for_failed_finishers(ctx, [stage.name for stage in stages])
    return best_val


def _run_stage(ctx: RunContext, cfg: DictConfig, stage: ChainStage, dm: DiscDataModule, files: list[Path],
               tags: dict[str, str]) -> dict[str, Any]:
    results = ctx.state.stages
    module = _stage_module(cfg, stage, results)
    own_tags = _stage_tags(stage)
    stage_tags = tags | own_tags
    params = {"stage.arm": stage.arm, "stage.base": own_tags["base"], "stage.source": stage.source or "(none)"}
    own_callbacks = _stage_callbacks(cfg, stage, results, ctx.run_dir / stage.name)
    def add_network(result: dict[str, Any]) -> None:
        # The tested (best) network, saved whole with its widths: the next iteration starts from it, the
        # distillation arm learns from it, and it reloads without the checkpoint's training state. Written before
        # the stage is recorded done, and under DDP by rank 0 alone (the others take the path from its record).
        network = ctx.run_dir / stage.name / NETWORK_FILE
        save_network(module.net.cpu(), network)
        result["network"] = str(network)
        if stage.arm == BASE_ARM:
            result["hard_cases"] = list(dm.hard_case_ids)

    # A finisher's file is written from its last epoch's weights, so those are the ones tested (its best
    # checkpoint may be an earlier epoch, and a QAT checkpoint only loads into a QAT-prepared network).
    return fit_and_test_stage(ctx, stage.name, module, dm, files, stage_tags,
                              extra_callbacks=own_callbacks, extra_params=params,
                              trainer_overrides=_trainer_overrides(cfg, stage),
                              test_final_weights=stage.arm in FINISHERS,
                              callback_overrides=_FINISHER_OVERRIDES if stage.arm in FINISHERS else None,
                              add_outputs=add_network)


def _retest_stage(ctx: RunContext, cfg: DictConfig, stage: ChainStage, dm: DiscDataModule,
                  tags: dict[str, str]) -> dict[str, Any]:
    """The finished stage's tested network (its ``network.pt``) tested again with today's callbacks. Finishers
    are skipped by the caller: what they deploy is their int8 / packed file, not a network to test again."""
    network = ctx.state.stages[stage.name]["network"]
    module = instantiate(_segmenter_config(cfg, stage), network_path=network, vgg16_weights=None,
                         encoder_weights=None, **_kd_arguments(cfg))
    return retest_stage(ctx, stage.name, module, dm, tags | _stage_tags(stage))


def _log_summary(ctx: RunContext, parent: str, table, tolerance: float) -> None:
    points = liminal_points(table, tolerance)
    # a comparison stage has no base: "-" rather than pandas' <NA>
    shown = table.assign(size_MB=table["size_bytes"] / 1e6,
                         base=[("-" if pd.isna(base) else int(base)) for base in table["base"]])
    shown = shown.drop(columns=["size_bytes", "note"])  # a failed stage's note is listed below the table
    notes = [describe_liminal(points, tolerance), describe_comparisons(table), describe_failures(table)]
    markdown = (shown.to_markdown(index=False, floatfmt=".4g") + "\n\n"
                + "\n\n".join(note for note in notes if note) + "\n")
    csv_path, md_path = ctx.run_dir / "summary.csv", ctx.run_dir / "summary.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown)
    for path in (csv_path, md_path):
        ctx.tracker.client.log_artifact(parent, str(path), artifact_path="summary")
    metrics: dict[str, float] = {}
    for row in table.itertuples():
        for column in ("dice", "iou", "latency_ms", "size_bytes", "params", "edge_case_detection",
                       "cumulative_train_time_s"):
            value = getattr(row, column)
            if value == value:  # not NaN
                metrics[f"{row.stage}/{column}"] = float(value)
    for arm, point in points.items():
        if point is not None:
            metrics[f"liminal/{arm}_base"] = float(point["base"])
    ctx.tracker.log_metrics(parent, metrics)
    log.info("\nCompression chain summary (test split; %s):\n\n%s", md_path, markdown)


@hydra.main(version_base="1.3", config_path="conf", config_name="glaucoma_chain")
def main(cfg: DictConfig) -> float | None:
    quiet_onnx_tool_logs()  # the qat finishers' int8 export would print pages
    return exit_on_user_errors(lambda: run_glaucoma_chain(cfg))


if __name__ == "__main__":
    main()
