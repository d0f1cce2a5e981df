"""``make predict``: grade a clinic's folder of fundus photographs, or segment their optic discs, on the CPU.

    python -m experiments.predict model=outputs/dr-distill/runs/<time> input=/data/clinic/today
    python -m experiments.predict model=<MLflow run id> input=photo.jpg output=grades.csv precision=fp32
    python -m experiments.predict model=outputs/glaucoma-iterations/runs/<time> input=today/ output=discs/
    python -m experiments.predict model=<bundle> input=today/ gradcam=true overwrite=true

``model=`` names a deployment bundle (``compression.deploy``) directly or through its stage folder, its run
folder or its MLflow run (see ``resolve_bundle``); the log says which stage was chosen, and why another was
passed over (a stage tested before bundles existed has none). Every top-level file of ``input=`` is tried in
name order; each gets a row with its ``status``:

* ``ok``: predicted;
* ``skipped``: unreadable, or no usable fundus photograph (``datamodules.photograph.read_photograph``, the check training applies: e.g.
  almost black, greyscale, transparent parts); ``reason`` says which;
* ``failed``: anything else went wrong with that file; ``reason`` is the error's type and message (its
  traceback is logged at debug level). The other files are still predicted.

The CSV is written even when the command is interrupted, with the rows done so far.

Outputs (``output=null`` puts them beside the input; never inside an input folder, whose next run would read
them as photographs):

* grading: one CSV, ``<input>_predictions.csv`` by default: ``file, status, grade, prob_<class>...,
  latency_ms`` (reading the file to the grade) ``, model_ms`` (ONNX Runtime alone) ``, reason``; with
  ``gradcam=true`` also ``<csv stem>_gradcam/<stem>_gradcam.png`` beside it (GradCAM of the reported grade);
* disc: a folder, ``<input>_discs/`` by default, with ``<stem>_mask.png`` (0/255, the photograph's size),
  ``<stem>_overlay.png``, with ``gradcam=true`` ``<stem>_gradcam.png``, and ``predictions.csv`` (``file,
  status, disc_area_fraction, mask, overlay, first_pass, latency_ms, model_ms, reason``; ``first_pass`` is what
  a two-pass (coarse-to-fine) bundle's first pass found: ``found``, or ``no disc found`` / ``several disc
  candidates`` when the whole-photograph mask was kept; empty for a one-pass bundle).

GradCAM maps lie on the preprocessed image the network saw (cropped to the retina, resized).

Nothing is written when any output file already exists, unless ``overwrite=true``. Exit status: 0 when at
least one file was predicted, 1 when none could be, 2 for a wrong ``model=``, ``input=`` or ``output=``, or
outputs that exist without ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from compression.benchmark import default_threads
from compression.deploy import (
    DEPLOY_DIR_TAG,
    DEPLOY_FOLDER,
    MANIFEST_FILE,
    PRECISIONS,
    RUNTIME_CHOICES,
    RUNTIME_NAMES,
    Bundle,
    BundleError,
    DiscPrediction,
    GradingPrediction,
    Predictor,
    describe_predictor,
    load_bundle,
    rebundle_command,
    write_atomically,
)
from compression.export import quiet_onnx_tool_logs
from datamodules.photograph import NotAFundusError, UnreadableImageError
from experiments.chain_summary import BASE_ARM, DEFAULT_LIMINAL_TOLERANCE, FINISHERS, liminal_points
from experiments.stages import DR_FINISHERS, DR_STAGES, run_key_as_overrides
from experiments.tracking import child_runs, default_tracking_uri, is_parent, read_csv_artifact

log = logging.getLogger(__name__)

DISC_CSV = "predictions.csv"
#: the make target of each kind of run, for the messages that say how to add missing bundles
MAKE_DR, MAKE_CHAIN = "make dr-distill", "make glaucoma-iterations"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
#: a comma of Hydra's override dirname that separates two overrides (not one inside a list value, [a,b])


class PredictError(ValueError):
    """A wrong ``model=``, ``input=`` or ``output=``: the message says what was given and what to give."""


# ------------------------------------------------------------------------------------ choosing a stage
#: (stage, why it is chosen): a run's finished stages in order of preference
Preference = list[tuple[str, str]]


#: dr-distill's stages, best deliverable first, and why each is chosen
DR_PREFERENCE = {"student_qat": "the quantization-aware student", "student": "the distilled student",
                 "teacher": "the teacher", "baseline": "the architecture baseline (experiment=dr_baselines)"}


def dr_stage_preference(stages: Sequence[str]) -> Preference:
    """The finished stages of a dr-distill run, best first: the int8-trained student, the student, the teacher,
    an architecture baseline."""
    return [(stage, reason) for stage, reason in DR_PREFERENCE.items() if stage in stages]


def disc_stage_preference(stages: Sequence[str], summary: pd.DataFrame | None,
                          tolerance: float = DEFAULT_LIMINAL_TOLERANCE) -> Preference:
    """The finished stages of a glaucoma-iterations run, best first: the chain's liminal point
    (``liminal_points``' overall one, when below iteration 1), each arm's liminal point (smallest base first),
    the prune stages (smallest first), iteration 1."""
    points = liminal_points(summary, tolerance) if summary is not None and not summary.empty else {}
    within = f"Dice within {tolerance:.0%} of iteration 1's, edge cases still detected"
    preference: Preference = []
    overall = points.get("any")
    if overall is not None and overall["arm"] != BASE_ARM:
        preference.append((overall["stage"], f"the liminal point of the chain (smallest base with {within})"))
    arm_points = sorted((point for arm, point in points.items() if arm not in ("any", BASE_ARM) and point),
                        key=lambda point: (point["base"], -point["dice"]))
    preference += [(point["stage"], f"the liminal point of the {point['arm']} arm (its smallest base with "
                                    f"{within})") for point in arm_points]
    liminal = bool(preference)
    prunes = sorted((s for s in stages if re.fullmatch(r"prune-\d+", s)), key=lambda s: int(s.split("-")[1]))
    preference += [(stage, "the smallest prune stage" + ("" if liminal else " (no liminal point named)")
                    if index == 0 else "the next smallest prune stage") for index, stage in enumerate(prunes)]
    preference += [(stage, "iteration 1" + ("" if prunes else " (the chain has no prune stage)"))
                   for stage in stages if stage.startswith(f"{BASE_ARM}-")]
    chosen: dict[str, str] = {}
    for stage, why in preference:
        if stage in stages:
            chosen.setdefault(stage, why)  # an arm's liminal point may be the chain's: keep the first reason
    return list(chosen.items())


def is_finisher(stage: str) -> bool:
    """A stage that fine-tunes a finished one into a file of its own (student_qat, qat-*, share-*): retest=true
    cannot test it again, so an old run's finisher never gets a bundle."""
    return stage in DR_FINISHERS or stage.split("-")[0] in FINISHERS


def first_with_bundle(preference: Preference, has_bundle: Callable[[str], bool], run: str,
                      rebundle: str) -> tuple[str, str]:
    """(stage, why) of the first stage of ``preference`` that has a deployment bundle; those passed over are
    logged.

    Raises:
        PredictError: none has one (or the run has no finished stage); the message names the run (``run``) and
            the command that bundles its stages again (``rebundle``).
    """
    if not preference:
        raise PredictError(f"{run} has no finished stage to predict with")
    passed: list[str] = []
    for stage, why in preference:
        if has_bundle(stage):
            if passed:
                log.warning("%s: stage(s) %s have no deployment bundle (tested before bundles existed, or the "
                            "test failed): using %s, the next in order of preference", run, ", ".join(passed),
                            stage)
                why = f"{why}; preferred stage(s) {', '.join(passed)} have no bundle"
            return stage, why
        passed.append(stage)
    finishers = ", ".join([*DR_FINISHERS, *(f"{name}-*" for name in FINISHERS)])
    others = ", ".join(stage for stage in passed if not is_finisher(stage)) or "none in this run"
    raise PredictError(f"none of the finished stages of {run} has a deployment bundle ({', '.join(passed)}): "
                       f"they were tested before bundles existed, or their tests failed. Finishers ({finishers}) "
                       f"cannot be bundled again; the other stages ({others}) can, without training: {rebundle}")


def run_overrides(run_key: str) -> str:
    """A run's overrides as typed on the command line, from its run key (run_state.json's ``run_key``, Hydra's
    comma-separated override dirname; ``(defaults)`` for none)."""
    return run_key_as_overrides(run_key)


# ---------------------------------------------------------------------------------- resolving model=
def resolve_bundle(model: str, cache_dir: Path, tracking_uri: str) -> tuple[Path, str]:
    """(bundle folder, how it was found) for ``model=``: a bundle folder, a stage folder holding ``deploy/``,
    a run folder of ``outputs/`` (its first stage with a bundle in the order of :func:`dr_stage_preference` /
    :func:`disc_stage_preference`), or an MLflow run id of ``tracking_uri`` (a child run: its ``deploy_dir``
    tag, else its ``deploy/`` artifacts downloaded under ``cache_dir``; a parent run: a child chosen as for run
    folders)."""
    path = Path(model).expanduser()
    if path.exists():
        return _bundle_of_path(path)
    if not _RUN_ID.match(model):
        raise PredictError(f"model={model}: no such file or folder, and not an MLflow run id (32 hex "
                           "digits). Give a bundle folder (deploy/), a stage or run folder under outputs/, "
                           "or a run id")
    return _bundle_of_mlflow_run(model, MlflowClient(tracking_uri), cache_dir, tracking_uri)


def _bundle_of_path(path: Path) -> tuple[Path, str]:
    if (path / MANIFEST_FILE).is_file():
        return path, f"bundle folder {path}"
    if (path / DEPLOY_FOLDER / MANIFEST_FILE).is_file():
        return path / DEPLOY_FOLDER, f"stage folder {path}"
    if (path / "run_state.json").is_file():
        return _bundle_of_run_folder(path)
    raise PredictError(f"model={path}: holds neither {MANIFEST_FILE} (a bundle folder), {DEPLOY_FOLDER}/"
                       f"{MANIFEST_FILE} (a stage folder) nor run_state.json (a run folder). Stages tested "
                       "before deployment bundles existed have none: add them without training with "
                       + rebundle_command(f"{MAKE_DR}|glaucoma-iterations", "<the run's own overrides>",
                                          "<run folder>"))


def _bundle_of_run_folder(run_dir: Path) -> tuple[Path, str]:
    state = json.loads((run_dir / "run_state.json").read_text())
    stages = [name for name, result in (state.get("stages") or {}).items() if result.get("status") == "done"]
    if set(stages) & set(DR_STAGES):
        preference, target = dr_stage_preference(stages), MAKE_DR
    else:
        summary_file, config_file = run_dir / "summary.csv", run_dir / "config.yaml"
        summary = pd.read_csv(summary_file) if summary_file.is_file() else None
        config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
        tolerance = float(OmegaConf.select(config, "chain.liminal_tolerance",
                                           default=DEFAULT_LIMINAL_TOLERANCE))
        preference, target = disc_stage_preference(stages, summary, tolerance), MAKE_CHAIN
    rebundle = rebundle_command(target, run_overrides(str(state.get("run_key", ""))), str(run_dir))
    def has_bundle(candidate: str) -> bool:
        return (run_dir / candidate / DEPLOY_FOLDER / MANIFEST_FILE).is_file()

    stage, why = first_with_bundle(preference, has_bundle, f"run {run_dir}", rebundle)
    return run_dir / stage / DEPLOY_FOLDER, f"stage {stage} of run {run_dir}: {why}"


def _bundle_of_mlflow_run(run_id: str, client: MlflowClient, cache_dir: Path,
                          tracking_uri: str) -> tuple[Path, str]:
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise PredictError(f"model={run_id}: no such run in the MLflow store {tracking_uri} (set "
                           "MLFLOW_TRACKING_URI for another store)") from error
    why = f"MLflow run {run.info.run_name} ({run_id})"
    if is_parent(run):
        by_stage = {child.info.run_name: child for child in child_runs(client, run)
                    if child.info.status == "FINISHED"}
        if set(by_stage) & set(DR_STAGES):
            preference, target = dr_stage_preference(list(by_stage)), MAKE_DR
        else:
            summary = _download_summary(client, run, cache_dir)
            tolerance = float(run.data.params.get("chain.liminal_tolerance", DEFAULT_LIMINAL_TOLERANCE))
            preference, target = disc_stage_preference(list(by_stage), summary, tolerance), MAKE_CHAIN
        # the run name is "<task>[<override dirname>]" (experiments.runner.run_name); the folder is not logged
        name = run.info.run_name or ""
        overrides = run_overrides(name[name.index("[") + 1:-1] if name.endswith("]") and "[" in name else "")
        rebundle = rebundle_command(target, overrides, f"<its run folder under outputs/{target.split()[-1]}/runs/>")
        stage, reason = first_with_bundle(
            preference, lambda candidate: _child_has_bundle(client, by_stage[candidate]), why, rebundle)
        run = by_stage[stage]
        why = f"stage {stage} of {why}: {reason}"
    return _bundle_of_child_run(client, run, cache_dir), why


def _download_summary(client: MlflowClient, run, cache_dir: Path) -> pd.DataFrame | None:
    try:
        return read_csv_artifact(client, run, "summary/summary.csv", cache_dir / "predict")
    except (MlflowException, OSError):
        return None


def _child_has_bundle(client: MlflowClient, run) -> bool:
    tagged = run.data.tags.get(DEPLOY_DIR_TAG)
    if tagged and (Path(tagged) / MANIFEST_FILE).is_file():
        return True
    try:
        return any(item.path == f"{DEPLOY_FOLDER}/{MANIFEST_FILE}"
                   for item in client.list_artifacts(run.info.run_id, DEPLOY_FOLDER))
    except (MlflowException, OSError):
        return False


def _bundle_of_child_run(client: MlflowClient, run, cache_dir: Path) -> Path:
    tagged = run.data.tags.get(DEPLOY_DIR_TAG)
    if tagged and (Path(tagged) / MANIFEST_FILE).is_file():
        return Path(tagged)
    # another machine's folder, or a moved one: the bundle's copy in the store
    target = cache_dir / "predict" / run.info.run_id
    shutil.rmtree(target / DEPLOY_FOLDER, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run.info.run_id, DEPLOY_FOLDER, str(target)))
    except (MlflowException, OSError) as error:
        raise PredictError(f"MLflow run {run.info.run_name} ({run.info.run_id}) has no {DEPLOY_FOLDER}/ "
                           "artifacts: it was tested before deployment bundles existed") from error


# ----------------------------------------------------------------------------------- inputs, outputs
def list_inputs(source: Path) -> list[Path]:
    """``source`` itself, or the files at the top of the folder in name order (hidden files left out)."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise PredictError(f"input={source}: no such file or folder")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    folders = [p.name for p in source.iterdir() if p.is_dir()]
    if folders:
        log.info("input=%s: %d sub-folder(s) not searched (%s)", source, len(folders),
                 ", ".join(sorted(folders)[:5]))
    if not files:
        raise PredictError(f"input={source}: the folder holds no files (sub-folders are not searched)")
    return files


def default_output(source: Path, task: str) -> Path:
    """Beside the input (a folder's files must not mix with its results): ``<input>_predictions.csv`` for
    grading, ``<input>_discs/`` for disc."""
    source = source.resolve()
    base = source.parent / (source.name if source.is_dir() else source.stem)
    return Path(f"{base}_predictions.csv") if task == "grading" else Path(f"{base}_discs")


def gradcam_folder(task: str, output: Path) -> Path:
    """Where the GradCAM overlays go: ``<csv stem>_gradcam/`` beside a grading CSV (a folder of its own, so
    that they never mix with other files there), the output folder itself for disc."""
    return output.with_name(f"{output.stem}_gradcam") if task == "grading" else output


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """The stem each file's outputs are named by; files sharing a stem (a.png, a.jpg) keep their suffix."""
    stems = [f.stem for f in files]
    return {f: f.stem if stems.count(f.stem) == 1 else f.name for f in files}


def planned_outputs(task: str, output: Path, names: dict[Path, str], gradcam: bool) -> list[Path]:
    """Every file this invocation may write."""
    files = [output] if task == "grading" else [output / DISC_CSV]
    if task == "disc":
        files += [output / f"{name}_{kind}.png" for name in names.values() for kind in ("mask", "overlay")]
    if gradcam:
        files += [gradcam_folder(task, output) / f"{name}_gradcam.png" for name in names.values()]
    return files


def write_rgb_png(path: Path, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Atomically, with the usual file permissions (``compression.deploy.write_atomically``)."""
    write_atomically(path, lambda temporary: table.to_csv(temporary, index=False))


# ---------------------------------------------------------------------------------------- predicting
class GradCamWriter:
    """GradCAM (``lightning_modules.explain``) on the preprocessed image, from the bundle's torch network:
    for a grade, the fp32 network's explanation of the grade the (int8) ONNX model gave; for a disc, of the
    pixels predicted as disc."""

    def __init__(self, bundle: Bundle):
        # imported here: only gradcam=true needs the grad-cam package and the torch network
        from lightning_modules import explain

        self.explain = explain
        self.net = bundle.load_network()
        self.layer = explain.grad_cam_target_layer(self.net)
        # a disc is the pixels above the stage's own probability threshold, as in its masks
        self.threshold = bundle.threshold if bundle.task == "disc" else 0.5

    def write(self, prediction: GradingPrediction | DiscPrediction, path: Path) -> None:
        target = [prediction.grade] if isinstance(prediction, GradingPrediction) else None
        heatmap = self.explain.grad_cam_heatmaps(self.net, prediction.inputs, self.layer, target,
                                                   threshold=self.threshold)[0]
        image = self.explain.denormalize_image(prediction.inputs[0][0])
        write_rgb_png(path, self.explain.overlay_heatmap(image, heatmap))


def _skip_reason(error: Exception, path: Path) -> str:
    """The error's message without the file name the row already shows."""
    return str(error).removeprefix(f"{path}: ")


def predict_file_row(predictor: Predictor, path: Path, output: Path, name: str,
                     gradcam: GradCamWriter | None) -> dict[str, Any]:
    """The CSV row of one file: predicted (its mask, overlay and GradCAM files written), skipped (unreadable or
    not a fundus photograph) or failed (any other error, logged with its traceback at debug level)."""
    bundle = predictor.bundle
    try:
        prediction = predictor.predict_file(path)
        row: dict[str, Any] = {"file": path.name, "status": "ok"}
        if isinstance(prediction, DiscPrediction):
            mask_file, overlay_file = f"{name}_mask.png", f"{name}_overlay.png"
            if not cv2.imwrite(str(output / mask_file), prediction.mask):
                raise OSError(f"cannot write {output / mask_file}")
            write_rgb_png(output / overlay_file, prediction.overlay)
            row |= {"disc_area_fraction": prediction.area_fraction, "mask": mask_file,
                    "overlay": overlay_file, "first_pass": prediction.first_pass}
        else:
            row["grade"] = prediction.grade
            row |= {f"prob_{label}": float(p)
                    for label, p in zip(bundle.class_names, prediction.probabilities, strict=True)}
        if gradcam is not None:
            gradcam.write(prediction, gradcam_folder(bundle.task, output) / f"{name}_gradcam.png")
    except (UnreadableImageError, NotAFundusError) as error:
        return {"file": path.name, "status": "skipped", "reason": _skip_reason(error, path)}
    except Exception as error:  # one bad file must not cost the rest of the folder its predictions
        log.debug("Predicting %s failed", path, exc_info=True)
        return {"file": path.name, "status": "failed", "reason": f"{type(error).__name__}: {error}"}
    return row | {"latency_ms": prediction.latency_ms, "model_ms": prediction.model_ms, "reason": ""}


def predict_files(predictor: Predictor, files: Sequence[Path], output: Path, names: dict[Path, str],
                  gradcam: GradCamWriter | None, rows: list[dict[str, Any]]) -> None:
    """Append one row per file to ``rows`` (:func:`predict_file_row`), so that the caller keeps the rows done
    when it is interrupted."""
    for path in tqdm(files, desc=f"predicting ({predictor.bundle.task}, {predictor.precision})", unit="image",
                     file=sys.stderr, dynamic_ncols=True):
        rows.append(predict_file_row(predictor, path, output, names[path], gradcam))


def _table(rows: list[dict[str, Any]], bundle: Bundle) -> pd.DataFrame:
    if bundle.task == "grading":
        columns = ["file", "status", "grade", *(f"prob_{name}" for name in bundle.class_names)]
    else:
        columns = ["file", "status", "disc_area_fraction", "mask", "overlay", "first_pass"]
    table = pd.DataFrame(rows).reindex(columns=[*columns, "latency_ms", "model_ms", "reason"])
    if "grade" in table:
        table["grade"] = table["grade"].astype("Int64")  # skipped rows stay empty, grades stay integers
    table["reason"] = table["reason"].fillna("")
    return table


def run_predict(cfg: DictConfig) -> int:
    """Predict every file of ``cfg.input`` with the bundle of ``cfg.model``; returns the exit status (0: at
    least one file predicted, 1: none could be). The CSV is written even when interrupted.

    Raises:
        PredictError: a wrong ``model=``, ``input=``, ``output=`` or option, or outputs that exist without
            ``overwrite=true``; nothing was written.
        BundleError: the bundle is incomplete or damaged.
    """
    if not cfg.model or not cfg.input:
        raise PredictError('model= and input= are required, e.g. make predict ARGS="model=outputs/dr-distill/'
                           'runs/<time> input=<folder of photographs>"')
    if cfg.precision not in PRECISIONS:
        raise PredictError(f"precision={cfg.precision}: choose one of {PRECISIONS}")
    if cfg.runtime not in RUNTIME_CHOICES:
        raise PredictError(f"runtime={cfg.runtime}: choose one of {RUNTIME_CHOICES}")
    project_root = Path(cfg.paths.root_dir).resolve()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_root)
    folder, found = resolve_bundle(str(cfg.model), Path(cfg.paths.cache_dir).resolve(), tracking_uri)
    bundle = load_bundle(folder)
    source = Path(str(cfg.input)).expanduser()
    files = list_inputs(source)
    output = Path(str(cfg.output)).expanduser() if cfg.output else default_output(source, bundle.task)
    gradcam = bool(cfg.gradcam)
    check_output(bundle.task, source, output, gradcam)
    names = output_names(files)
    existing = [p for p in planned_outputs(bundle.task, output, names, gradcam) if p.exists()]
    if existing and not cfg.overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise PredictError(f"{len(existing)} output file(s) already exist ({shown}): nothing was written. "
                           "Pass overwrite=true to replace them, or choose another output=")
    threads = int(cfg.threads) if cfg.threads else default_threads()
    predictor = Predictor(bundle, str(cfg.precision), threads, str(cfg.runtime))
    explainer = GradCamWriter(bundle) if gradcam else None
    log.info("Model: %s\nBundle %s (%s, stage %s), %s, %d thread(s); %d file(s) from %s",
             found, bundle.folder, bundle.task, bundle.stage, describe_predictor(predictor), threads, len(files),
             source)
    csv_path = output / DISC_CSV if bundle.task == "disc" else output
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if gradcam:
        gradcam_folder(bundle.task, output).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        predict_files(predictor, files, output, names, explainer, rows)
    finally:
        table = _table(rows, bundle)
        write_csv(table, csv_path)
        if len(rows) < len(files):
            log.error("Stopped after %d of %d file(s): their rows are in %s", len(rows), len(files), csv_path)
    counts = table["status"].value_counts()
    for row in table[table["status"] != "ok"].itertuples():
        log.warning("%s %s: %s", str(row.status).capitalize(), row.file, row.reason)
    done = int(counts.get("ok", 0))
    seconds = time.perf_counter() - started
    # from reading each file to writing its outputs: what a clinic waits for, on this runtime
    log.info("Predicted %d of %d file(s) (%d skipped, %d failed) in %.1f s, %.1f images/s on %s: %s", done,
             len(table), counts.get("skipped", 0), counts.get("failed", 0), seconds, len(table) / max(seconds, 1e-9),
             RUNTIME_NAMES[predictor.runtime], csv_path)
    if done == 0:
        log.error("No file could be predicted: see the reasons in %s", csv_path)
        return 1
    return 0


def check_output(task: str, source: Path, output: Path, gradcam: bool) -> None:
    """Refuse an ``output=`` of the wrong kind, or one inside the input folder: a later run on that folder
    would read our CSV and PNGs as photographs.

    Raises:
        PredictError: naming the output and what to give instead.
    """
    if task == "grading":
        if output.is_dir():
            raise PredictError(f"output={output} is a folder: a grading bundle writes one CSV file, e.g. "
                               f"output={output / 'predictions.csv'}")
        if output.suffix.lower() != ".csv":
            raise PredictError(f"output={output}: a grading bundle writes a CSV file; name it *.csv")
    elif output.exists() and not output.is_dir():
        raise PredictError(f"output={output} is a file: a disc bundle writes masks, overlays and {DISC_CSV} "
                           "into a folder")
    written = [output, *([gradcam_folder(task, output)] if gradcam else [])]
    if gradcam and task == "grading" and written[1].exists() and not written[1].is_dir():
        raise PredictError(f"{written[1]} is a file: gradcam=true writes its overlays into a folder of that "
                           "name; move the file or choose another output=")
    if source.is_dir():
        inside = [path for path in written if path.resolve().is_relative_to(source.resolve())]
        if inside:
            raise PredictError(f"output={output}: {inside[0]} would be inside the input folder {source}, and "
                               "a later run on that folder would read the outputs as photographs; choose a "
                               "place outside it (output=null puts them beside it)")


def exit_status(cfg: DictConfig) -> int:
    """:func:`run_predict`'s status, and 2 (the error logged) for a wrong ``model=``, ``input=`` or
    ``output=``, a refused overwrite or a damaged bundle."""
    try:
        return run_predict(cfg)
    except (PredictError, BundleError) as error:
        log.error("%s", error)
        return 2


@hydra.main(version_base="1.3", config_path="conf/predict", config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_onnx_tool_logs()
    sys.exit(exit_status(cfg))


if __name__ == "__main__":
    main()
