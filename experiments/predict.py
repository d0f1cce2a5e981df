"""``make predict``: grade a clinic's folder of fundus photographs, or segment their optic discs, on the CPU.

    python -m experiments.predict model=outputs/dr-distill/runs/<time> input=/data/clinic/today
    python -m experiments.predict model=<MLflow run id> input=photo.jpg output=grades.csv precision=fp32
    python -m experiments.predict model=outputs/glaucoma-iterations/runs/<time> input=today/ output=discs/
    python -m experiments.predict model=<bundle> input=today/ gradcam=true overwrite=true

``model=`` names a deployment bundle (``compression.deploy``) directly or through its stage folder, its run
folder or its MLflow run (see ``resolve_bundle``); the log says which stage was chosen. Every top-level file
of ``input=`` is tried in name order: unreadable files and images that are no usable fundus photograph are
listed in the output as ``status=skipped`` with the reason, and the others are predicted.

Outputs (``output=null`` puts them beside the input, never inside it):

* grading: one CSV, ``<input>_predictions.csv`` by default: ``file, status, grade, prob_<class>...,
  latency_ms`` (reading the file to the grade) ``, model_ms`` (ONNX Runtime alone) ``, reason``; with
  ``gradcam=true`` also ``<stem>_gradcam.png`` next to it (GradCAM of the reported grade);
* disc: a folder, ``<input>_discs/`` by default, with ``<stem>_mask.png`` (0/255, the photograph's size),
  ``<stem>_overlay.png``, with ``gradcam=true`` ``<stem>_gradcam.png``, and ``predictions.csv`` (``file,
  status, disc_area_fraction, mask, overlay, latency_ms, model_ms, reason``).

GradCAM maps lie on the preprocessed image the network saw (cropped to the retina, resized).

Nothing is written when any output file already exists, unless ``overwrite=true``. Exit status: 0 when at
least one file was predicted, 1 when none could be, 2 for a wrong ``model=``, ``input=`` or ``output=``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from compression.benchmark import default_threads
from compression.deploy import (
    DEPLOY_DIR_TAG,
    DEPLOY_FOLDER,
    MANIFEST_FILE,
    PRECISIONS,
    Bundle,
    BundleError,
    DiscPrediction,
    GradingPrediction,
    NotAFundusError,
    Predictor,
    load_bundle,
)
from compression.export import quiet_onnx_tool_logs
from datamodules.fundus import UnreadableImageError
from experiments.chain_summary import BASE_ARM, liminal_points
from experiments.tracking import default_tracking_uri

log = logging.getLogger(__name__)

DR_STAGES = ("teacher", "student", "student_qat")
DEFAULT_LIMINAL_TOLERANCE = 0.05  # chain.liminal_tolerance's default, for runs whose config lacks it
DISC_CSV = "predictions.csv"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class PredictError(ValueError):
    """A wrong ``model=``, ``input=`` or ``output=``: the message says what was given and what to give."""


# ------------------------------------------------------------------------------------ choosing a stage
def choose_dr_stage(stages: Sequence[str]) -> tuple[str, str]:
    """(stage, why) of a dr-distill run with these finished stages: the int8-trained student, else the
    student."""
    for stage, why in (("student_qat", "the quantization-aware student"),
                       ("student", "the distilled student"),
                       ("teacher", "the teacher (the run has no student)")):
        if stage in stages:
            return stage, why
    raise PredictError(f"the dr-distill run has no finished stage among {list(DR_STAGES)} (it has "
                       f"{list(stages)})")


def choose_disc_stage(stages: Sequence[str], summary: pd.DataFrame | None,
                      tolerance: float = DEFAULT_LIMINAL_TOLERANCE) -> tuple[str, str]:
    """(stage, why) of a glaucoma-iterations run: the chain's liminal point (``liminal_points``' overall one)
    when the summary names one below iteration 1, else the smallest prune stage, else iteration 1."""
    points = liminal_points(summary, tolerance) if summary is not None and not summary.empty else {}
    point = points.get("any")
    if point is not None and point["arm"] != BASE_ARM and point["stage"] in stages:
        return point["stage"], (f"the liminal point of the chain (smallest base with Dice within "
                                f"{tolerance:.0%} of iteration 1's, edge cases still detected)")
    prunes = [s for s in stages if re.fullmatch(r"prune-\d+", s)]
    if prunes:
        smallest = min(prunes, key=lambda s: int(s.split("-")[1]))
        return smallest, "the smallest prune stage (no liminal point named)"
    bases = [s for s in stages if s.startswith(f"{BASE_ARM}-")]
    if bases:
        return bases[0], "iteration 1 (the chain has no prune stage)"
    raise PredictError(f"the glaucoma-iterations run has no finished stage to predict with (it has "
                       f"{list(stages)})")


# ---------------------------------------------------------------------------------- resolving model=
def resolve_bundle(model: str, cache_dir: Path, tracking_uri: str) -> tuple[Path, str]:
    """(bundle folder, how it was found) for ``model=``: a bundle folder, a stage folder holding ``deploy/``,
    a run folder of ``outputs/`` (a stage chosen by :func:`choose_dr_stage` / :func:`choose_disc_stage`), or
    an MLflow run id of ``tracking_uri`` (a child run: its ``deploy_dir`` tag, else its ``deploy/`` artifacts
    downloaded under ``cache_dir``; a parent run: a child chosen as for run folders)."""
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
                       "`make dr-distill|glaucoma-iterations ARGS=\"retest=true resume=<run folder>\"`")


def _bundle_of_run_folder(run_dir: Path) -> tuple[Path, str]:
    state = json.loads((run_dir / "run_state.json").read_text())
    stages = [name for name, result in (state.get("stages") or {}).items() if result.get("status") == "done"]
    if set(stages) & set(DR_STAGES):
        stage, why = choose_dr_stage(stages)
    else:
        summary_file, config_file = run_dir / "summary.csv", run_dir / "config.yaml"
        summary = pd.read_csv(summary_file) if summary_file.is_file() else None
        config = OmegaConf.load(config_file) if config_file.is_file() else OmegaConf.create()
        tolerance = float(OmegaConf.select(config, "chain.liminal_tolerance",
                                           default=DEFAULT_LIMINAL_TOLERANCE))
        stage, why = choose_disc_stage(stages, summary, tolerance)
    folder = run_dir / stage / DEPLOY_FOLDER
    if not (folder / MANIFEST_FILE).is_file():
        raise PredictError(f"stage {stage} of run {run_dir} has no deployment bundle ({folder}): it was "
                           "tested before bundles existed or its test failed: write it without training with "
                           f"retest=true resume={run_dir} (make dr-distill / glaucoma-iterations), or pass "
                           "another stage folder as model=")
    return folder, f"stage {stage} of run {run_dir}: {why}"


def _bundle_of_mlflow_run(run_id: str, client: MlflowClient, cache_dir: Path,
                          tracking_uri: str) -> tuple[Path, str]:
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise PredictError(f"model={run_id}: no such run in the MLflow store {tracking_uri} (set "
                           "MLFLOW_TRACKING_URI for another store)") from error
    why = f"MLflow run {run.info.run_name} ({run_id})"
    if MLFLOW_PARENT_RUN_ID not in run.data.tags:
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}'")
        by_stage = {child.info.run_name: child for child in children if child.info.status == "FINISHED"}
        if set(by_stage) & set(DR_STAGES):
            stage, reason = choose_dr_stage(list(by_stage))
        else:
            summary = _download_summary(client, run_id, cache_dir)
            tolerance = float(run.data.params.get("chain.liminal_tolerance", DEFAULT_LIMINAL_TOLERANCE))
            stage, reason = choose_disc_stage(list(by_stage), summary, tolerance)
        run = by_stage[stage]
        why = f"stage {stage} of MLflow run {why}: {reason}"
    return _bundle_of_child_run(client, run, cache_dir), why


def _download_summary(client: MlflowClient, run_id: str, cache_dir: Path) -> pd.DataFrame | None:
    target = cache_dir / "predict" / run_id
    target.mkdir(parents=True, exist_ok=True)
    try:
        return pd.read_csv(client.download_artifacts(run_id, "summary/summary.csv", str(target)))
    except (MlflowException, OSError):
        return None


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


def output_names(files: Sequence[Path]) -> dict[Path, str]:
    """The stem each file's outputs are named by; files sharing a stem (a.png, a.jpg) keep their suffix."""
    stems = [f.stem for f in files]
    return {f: f.stem if stems.count(f.stem) == 1 else f.name for f in files}


def planned_outputs(task: str, output: Path, names: dict[Path, str], gradcam: bool) -> list[Path]:
    """Every file this invocation may write."""
    folder = output.parent if task == "grading" else output
    kinds = ["gradcam"] if gradcam else []
    if task == "grading":
        files = [output]
    else:
        files, kinds = [output / DISC_CSV], ["mask", "overlay", *kinds]
    return files + [folder / f"{name}_{kind}.png" for name in names.values() for kind in kinds]


def write_rgb_png(path: Path, image_rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_csv_atomically(table: pd.DataFrame, path: Path) -> None:
    """A crash never leaves a half-written CSV (nor a half-replaced earlier one)."""
    handle, temporary = tempfile.mkstemp(suffix=".csv", dir=path.parent)
    os.close(handle)
    try:
        table.to_csv(temporary, index=False)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


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

    def write(self, prediction: GradingPrediction | DiscPrediction, path: Path) -> None:
        target = [prediction.grade] if isinstance(prediction, GradingPrediction) else None
        heatmap = self.explain.grad_cam_heatmaps(self.net, prediction.inputs, self.layer, target)[0]
        image = self.explain.denormalize_image(prediction.inputs[0][0])
        write_rgb_png(path, self.explain.overlay_heatmap(image, heatmap))


def _skip_reason(error: Exception, path: Path) -> str:
    """The error's message without the file name the row already shows."""
    return str(error).removeprefix(f"{path}: ")


def predict_files(predictor: Predictor, files: Sequence[Path], output: Path, names: dict[Path, str],
                  gradcam: GradCamWriter | None) -> pd.DataFrame:
    """One row per file (predicted or skipped with its reason); mask, overlay and GradCAM files are written as
    they come."""
    bundle = predictor.bundle
    rows: list[dict[str, Any]] = []
    for path in tqdm(files, desc=f"predicting ({bundle.task}, {predictor.precision})", unit="image",
                     file=sys.stderr, dynamic_ncols=True):
        try:
            prediction = predictor.predict_file(path)
        except (UnreadableImageError, NotAFundusError) as error:
            rows.append({"file": path.name, "status": "skipped", "reason": _skip_reason(error, path)})
            continue
        row: dict[str, Any] = {"file": path.name, "status": "ok"}
        if isinstance(prediction, DiscPrediction):
            mask_file, overlay_file = f"{names[path]}_mask.png", f"{names[path]}_overlay.png"
            if not cv2.imwrite(str(output / mask_file), prediction.mask):
                raise OSError(f"cannot write {output / mask_file}")
            write_rgb_png(output / overlay_file, prediction.overlay)
            row |= {"disc_area_fraction": prediction.area_fraction, "mask": mask_file,
                    "overlay": overlay_file}
        else:
            row["grade"] = prediction.grade
            row |= {f"prob_{name}": float(p) for name, p in zip(bundle.class_names, prediction.probabilities,
                                                                 strict=True)}
        if gradcam is not None:
            folder = output if isinstance(prediction, DiscPrediction) else output.parent
            gradcam.write(prediction, folder / f"{names[path]}_gradcam.png")
        row |= {"latency_ms": prediction.latency_ms, "model_ms": prediction.model_ms, "reason": ""}
        rows.append(row)
    return _table(rows, bundle)


def _table(rows: list[dict[str, Any]], bundle: Bundle) -> pd.DataFrame:
    if bundle.task == "grading":
        columns = ["file", "status", "grade", *(f"prob_{name}" for name in bundle.class_names)]
    else:
        columns = ["file", "status", "disc_area_fraction", "mask", "overlay"]
    table = pd.DataFrame(rows).reindex(columns=[*columns, "latency_ms", "model_ms", "reason"])
    if "grade" in table:
        table["grade"] = table["grade"].astype("Int64")  # skipped rows stay empty, grades stay integers
    table["reason"] = table["reason"].fillna("")
    return table


def run_predict(cfg: DictConfig) -> int:
    """Predict every file of ``cfg.input`` with the bundle of ``cfg.model``; returns the exit status (0: at
    least one file predicted, 1: none could be).

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
    project_root = Path(cfg.paths.root_dir).resolve()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_root)
    folder, found = resolve_bundle(str(cfg.model), Path(cfg.paths.cache_dir).resolve(), tracking_uri)
    bundle = load_bundle(folder)
    source = Path(str(cfg.input)).expanduser()
    files = list_inputs(source)
    output = Path(str(cfg.output)).expanduser() if cfg.output else default_output(source, bundle.task)
    gradcam = bool(cfg.gradcam)
    _check_output(bundle.task, source, output)
    names = output_names(files)
    existing = [p for p in planned_outputs(bundle.task, output, names, gradcam) if p.exists()]
    if existing and not cfg.overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise PredictError(f"{len(existing)} output file(s) already exist ({shown}): nothing was written. "
                           "Pass overwrite=true to replace them, or choose another output=")
    threads = int(cfg.threads) if cfg.threads else default_threads()
    predictor = Predictor(bundle, str(cfg.precision), threads)
    explainer = GradCamWriter(bundle) if gradcam else None
    log.info("Model: %s\nBundle %s (%s, stage %s), %s ONNX model %s, %d thread(s); %d file(s) from %s",
             found, bundle.folder, bundle.task, bundle.stage, predictor.precision, predictor.onnx_path.name,
             threads, len(files), source)
    (output if bundle.task == "disc" else output.parent).mkdir(parents=True, exist_ok=True)
    table = predict_files(predictor, files, output, names, explainer)
    csv_path = output / DISC_CSV if bundle.task == "disc" else output
    write_csv_atomically(table, csv_path)
    done = int((table["status"] == "ok").sum())
    for row in table[table["status"] == "skipped"].itertuples():
        log.warning("Skipped %s: %s", row.file, row.reason)
    log.info("Predicted %d of %d file(s) (%d skipped): %s", done, len(table), len(table) - done, csv_path)
    if done == 0:
        log.error("No file could be predicted: see the reasons in %s", csv_path)
        return 1
    return 0


def _check_output(task: str, source: Path, output: Path) -> None:
    if task == "grading":
        if output.is_dir():
            raise PredictError(f"output={output} is a folder: a grading bundle writes one CSV file, e.g. "
                               f"output={output / 'predictions.csv'}")
        if output.suffix.lower() != ".csv":
            raise PredictError(f"output={output}: a grading bundle writes a CSV file; name it *.csv")
    elif output.exists() and not output.is_dir():
        raise PredictError(f"output={output} is a file: a disc bundle writes masks, overlays and {DISC_CSV} "
                           "into a folder")
    elif source.is_dir() and output.resolve() == source.resolve():
        raise PredictError(f"output={output} is the input folder: masks would mix with the photographs; "
                           "choose another folder")


@hydra.main(version_base="1.3", config_path="conf/predict", config_name="predict")
def main(cfg: DictConfig) -> None:
    quiet_onnx_tool_logs()
    try:
        status = run_predict(cfg)
    except (PredictError, BundleError) as error:
        log.error("%s", error)
        status = 2
    sys.exit(status)


if __name__ == "__main__":
    main()
