"""``make evaluate``: a trained model's deployment bundle scored on any labelled set, every image.

    python -m experiments.evaluate model=outputs/dr-distill/runs/<time> data=eyepacs data.root=/data/eyepacs
    python -m experiments.evaluate model=<MLflow run id> data=aptos data.root=/data/aptos precision=fp32
    python -m experiments.evaluate model=outputs/glaucoma-iterations/runs/<time> data=disc_folder data.root=<dir>

``model=`` is found as ``make predict`` finds it (``experiments.predict.resolve_bundle``: a glaucoma-iterations
run folder gives its liminal point); ``data=`` is given exactly as for training, and every image of the set is
scored (no split), through the bundle's own preprocessing and the photograph check training applies
(``compression.deploy.Predictor``). What cannot be scored is counted and listed with its reason, never fatal.

**Grading models** (``data=aptos|eyepacs|synthetic``): label rows without their image (``missing``), images no
row names (``unlabelled``), unusable photographs (``skipped``) and files that fail otherwise (``failed``) are
listed. A label file with grades outside 0-4, or whose images are all missing, stops before any inference.
Metrics: ``test/qwk``, ``test/acc``, ``test/f1_macro``, ``test/f1_weighted``, ``test/recall_<g>``, ``test/ece``,
the 95% bootstrap intervals ``test/qwk_ci_low``/``_high`` and ``test/acc_ci_low``/``_high``; artifacts: the
per-image predictions (the columns of a stage's ``test_predictions.csv``), the confusion matrix, reliability
diagram and precision-recall curves.

**Optic-disc models** (``data=disc_folder|synthetic_disc``; ``experiments.evaluate_masks``): each mask is scored
at its photograph's own size against the reference mask thresholded as in training: ``test/dice``, ``test/iou``,
``test/hd95`` (photograph pixels), ``test/false_detections`` and every other ``test/*`` a disc stage logs, plus a
bootstrap interval of the mean Dice (``test/dice_ci_low``/``_high``); files without a partner (``unpaired``),
unusable photographs or masks (``skipped``) and failures (``failed``) are listed. Artifacts: the per-image scores
and the ``worst_overlays`` lowest-Dice photographs (prediction green, reference magenta) under ``overlays/``.

Both: a child run ``external-<dataset>`` of the model's parent MLflow run (beside its internal test split; a
bundle whose run is not in the store gets a run of its own in the ``evaluate`` experiment) with the counts
``external/{scored,...}``, ``external/images_per_s`` and the data fingerprint as a tag; the per-image table
(``predictions/<stage>-<precision>-<model hash>.csv``) and the files not scored with their reasons
(``..._not_scored.csv``). Exit status 0, or 2 (logged) for a wrong ``model=``/``data=``, a model and a set of
different tasks, a damaged bundle or an unusable set.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import hydra
import numpy as np
import pandas as pd
import sklearn
from hydra.utils import instantiate
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from scipy import stats
from sklearn.metrics import confusion_matrix, f1_score, recall_score
from tqdm import tqdm

from callbacks.classification_diagnostics import predictions_table
from callbacks.confusion_matrix import plot_confusion_matrix
from compression.benchmark import default_threads
from compression.deploy import (
    PRECISIONS,
    RUNTIME_CHOICES,
    BundleError,
    Predictor,
    describe_predictor,
    load_bundle,
)
from compression.export import quiet_onnx_tool_logs
from datamodules.disc_index import disc_folder_pairs
from datamodules.dr import GRADING_TASK, DRDataModule
from datamodules.dr_index import NUM_GRADES, unlabelled_images
from datamodules.errors import DataValidationError
from datamodules.fundus import data_fingerprint
from datamodules.optic_disc import DISC_TASK, DiscDataModule, pairs_fingerprint
from datamodules.photograph import NotAFundusError, UnreadableImageError
from experiments.evaluate_masks import NOT_SCORED_COLUMNS, mask_metrics, score_pairs
from experiments.predict import PredictError, resolve_bundle, write_csv
from experiments.report_data import grading_scores
from experiments.stages import EXTERNAL_PREFIX
from experiments.tracking import (
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    default_artifact_root,
    default_tracking_uri,
    ensure_experiment,
)
from lightning_modules.explain import (
    expected_calibration_error,
    plot_precision_recall_curves,
    plot_reliability_diagram,
)

log = logging.getLogger(__name__)

#: the experiment of an evaluation whose model's run is not in the store
EVALUATE_EXPERIMENT = "evaluate"


class EvaluateError(ValueError):
    """A wrong ``model=``/``data=``/option, or a model that cannot be evaluated here; nothing was scored."""


@dataclass
class Scored:
    """One evaluation: per-image predictions of the scored images and the files that were not scored."""

    predictions: pd.DataFrame
    not_scored: pd.DataFrame
    seconds: float


def score_images(predictor: Predictor, index: pd.DataFrame) -> Scored:
    """Every image of ``index`` (``sample_id, path, label``) through ``predictor``; unusable photographs and
    failures are listed with their reason, not raised."""
    names, labels, probabilities, not_scored = [], [], [], []
    started = time.perf_counter()
    for row in tqdm(index.itertuples(), total=len(index), desc=f"evaluating ({predictor.precision})",
                    unit="image", file=sys.stderr, dynamic_ncols=True):
        try:
            prediction = predictor.predict_file(row.path)
        except (UnreadableImageError, NotAFundusError) as error:
            not_scored.append((row.sample_id, row.path, "skipped", str(error).removeprefix(f"{row.path}: ")))
            continue
        except Exception as error:  # one bad file must not cost the rest of the set its scores
            log.debug("Evaluating %s failed", row.path, exc_info=True)
            not_scored.append((row.sample_id, row.path, "failed", f"{type(error).__name__}: {error}"))
            continue
        names.append(row.sample_id)
        labels.append(int(row.label))
        probabilities.append(prediction.probabilities)
    seconds = time.perf_counter() - started
    table = predictions_table(names, np.asarray(labels, dtype=np.int64),
                              np.asarray(probabilities, dtype=np.float64).reshape(len(names), -1))
    return Scored(table, pd.DataFrame(not_scored, columns=["sample_id", "path", "status", "reason"]), seconds)


def grading_metrics(predictions: pd.DataFrame, num_classes: int, n_resamples: int = 1000,
                    confidence_level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``test/*`` metrics of per-image predictions (``predictions_table``): QWK, accuracy, macro and weighted
    F1, recall per grade, top-label ECE, and bootstrap intervals (over images) of QWK and accuracy."""
    # copies: pandas hands out read-only views, which torch (the suite's QWK) warns about
    truth = predictions["label"].to_numpy(copy=True)
    predicted = predictions["prediction"].to_numpy(copy=True)
    probabilities = predictions[[f"prob_{k}" for k in range(num_classes)]].to_numpy()
    labels = list(range(num_classes))
    qwk, accuracy, f1_macro = grading_scores(truth, predicted, num_classes)
    metrics = {"test/qwk": qwk, "test/acc": accuracy, "test/f1_macro": f1_macro,
               "test/f1_weighted": f1_score(truth, predicted, average="weighted", labels=labels, zero_division=0.0),
               "test/ece": expected_calibration_error(probabilities, truth)}
    recalls = recall_score(truth, predicted, average=None, labels=labels, zero_division=0.0)
    metrics |= {f"test/recall_{grade}": float(value) for grade, value in enumerate(recalls)}
    if len(truth) >= 2:
        # sklearn's argument checks are most of each call's time; the inputs were checked once, above
        with sklearn.config_context(skip_parameter_validation=True), np.errstate(invalid="ignore", divide="ignore"):
            interval = stats.bootstrap((truth, predicted), lambda t, p: grading_scores(t, p, num_classes)[:2],
                                       paired=True, vectorized=False, n_resamples=n_resamples,
                                       confidence_level=confidence_level, method="percentile",
                                       rng=np.random.default_rng(seed)).confidence_interval
        for position, name in enumerate(("qwk", "acc")):
            metrics[f"test/{name}_ci_low"] = float(interval.low[position])
            metrics[f"test/{name}_ci_high"] = float(interval.high[position])
    return {key: float(value) for key, value in metrics.items()}


def dataset_name(cfg: DictConfig, datamodule: DRDataModule) -> str:
    """``dataset_name=``, else the data root's folder name (``synthetic`` for the generated set)."""
    if cfg.get("dataset_name"):
        return str(cfg.dataset_name)
    return "synthetic" if datamodule.is_synthetic else Path(str(datamodule.root)).expanduser().resolve().name


def _external_run(client: MlflowClient, bundle_run_id: str | None, name: str, tags: dict[str, str],
                  artifact_location: str | None) -> tuple[str, str]:
    """(run id, where it is) of a new run ``name``: a child of the bundle's parent run when the store has it,
    else a run of the ``evaluate`` experiment."""
    stage_run = None
    if bundle_run_id:
        try:
            stage_run = client.get_run(bundle_run_id)
        except MlflowException:
            stage_run = None
    if stage_run is not None:
        parent = stage_run.data.tags.get(MLFLOW_PARENT_RUN_ID, stage_run.info.run_id)
        run = client.create_run(stage_run.info.experiment_id,
                                tags={MLFLOW_RUN_NAME: name, MLFLOW_PARENT_RUN_ID: parent, **tags})
        return run.info.run_id, f"a child of run {parent}"
    experiment_id = ensure_experiment(client, EVALUATE_EXPERIMENT, artifact_location)
    run = client.create_run(experiment_id, tags={MLFLOW_RUN_NAME: name, **tags})
    return run.info.run_id, f"experiment {EVALUATE_EXPERIMENT!r} (the model's own run is not in this store)"


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score ``cfg.model``'s bundle on ``cfg.data``; returns the logged metrics.

    Raises:
        EvaluateError / experiments.predict.PredictError: a wrong ``model=`` or option, or a model and a set
            of different tasks.
        compression.deploy.BundleError: the bundle is incomplete, damaged or of an old format.
        datamodules.errors.DataValidationError: the set is unusable (grades outside 0-4, no image; not a disc
            folder).
    """
    if not cfg.model:
        raise EvaluateError('model= is required, e.g. make evaluate ARGS="model=outputs/dr-distill/runs/<time> '
                            'data=eyepacs data.root=<folder>"')
    if cfg.precision not in PRECISIONS:
        raise EvaluateError(f"precision={cfg.precision}: choose one of {PRECISIONS}")
    if cfg.runtime not in RUNTIME_CHOICES:
        raise EvaluateError(f"runtime={cfg.runtime}: choose one of {RUNTIME_CHOICES}")
    project_root = Path(cfg.paths.root_dir).resolve()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(project_root)
    # the project's own store keeps artifacts under mlruns/artifacts; a server decides for itself
    artifact_location = None if os.environ.get("MLFLOW_TRACKING_URI") else default_artifact_root(project_root)
    folder, found = resolve_bundle(str(cfg.model), Path(cfg.paths.cache_dir).resolve(), tracking_uri)
    bundle = load_bundle(folder)
    datamodule = instantiate(cfg.data)
    store = _Store(tracking_uri, artifact_location)
    if bundle.task == GRADING_TASK:
        return _evaluate_grading(cfg, bundle, found, datamodule, store)
    if bundle.task == DISC_TASK:
        return _evaluate_masks(cfg, bundle, found, datamodule, store)
    raise EvaluateError(f"model={cfg.model}: {found} is a {bundle.task!r} model; make evaluate scores grading "
                        "(dr-distill) and optic-disc (glaucoma-iterations) models")


@dataclass(frozen=True)
class _Store:
    """Where the result goes; the client is made only once something was scored (opening an SQLite store
    creates it)."""

    tracking_uri: str
    artifact_location: str | None


def _evaluate_grading(cfg: DictConfig, bundle, found: str, datamodule, store: _Store) -> dict[str, float]:
    if len(bundle.class_names) != NUM_GRADES:
        raise EvaluateError(f"model={cfg.model}: the model has {len(bundle.class_names)} classes, the labels "
                            f"are the {NUM_GRADES} DR grades")
    if not isinstance(datamodule, DRDataModule):
        raise EvaluateError(f"data={cfg.data.get('format')}: {found} is a grading model; score it on a DR "
                            "grading set (data=aptos|eyepacs|synthetic data.root=<dir>)")
    datamodule.prepare_data()
    missing: list[str] = []
    index = datamodule.read_index(missing_images=missing)
    unlabelled = unlabelled_images(datamodule.dataset_root, index, datamodule.image_folders)
    name = dataset_name(cfg, datamodule)
    threads = int(cfg.threads) if cfg.threads else default_threads()
    predictor = Predictor(bundle, str(cfg.precision), threads, str(cfg.runtime))
    log.info("Model: %s\nBundle %s (stage %s), %s, %d thread(s); %d labelled image(s) of %s",
             found, bundle.folder, bundle.stage, describe_predictor(predictor), threads, len(index), name)
    scored = score_images(predictor, index)
    if scored.predictions.empty:
        raise DataValidationError(f"none of the {len(index)} images of {name} could be scored",
                                  scored.not_scored["reason"].head(20).tolist(),
                                  fix="check that data= and data.root name a set of colour fundus photographs")
    not_scored = pd.concat([
        scored.not_scored,
        pd.DataFrame({"sample_id": "", "path": "", "status": "missing", "reason": missing}),
        pd.DataFrame({"sample_id": [p.stem for p in unlabelled], "path": [str(p) for p in unlabelled],
                      "status": "unlabelled", "reason": "no row of the label file names it"}),
    ], ignore_index=True)
    settings = cfg.bootstrap
    metrics = grading_metrics(scored.predictions, NUM_GRADES, int(settings.n_resamples),
                              float(settings.confidence_level), int(settings.seed))
    metrics |= _counts(not_scored, len(scored.predictions), len(index), scored.seconds,
                       ("missing", "unlabelled", "skipped", "failed"))
    output, skipped_file = _write_tables(cfg, bundle, predictor, name, scored.predictions, not_scored)
    fingerprint = data_fingerprint(f"{row.sample_id}|{row.label}|{Path(row.path).stat().st_size}"
                                   for row in index.sort_values("sample_id").itertuples())
    predictions = scored.predictions
    truth = predictions["label"].to_numpy()
    probabilities = predictions[[f"prob_{k}" for k in range(NUM_GRADES)]].to_numpy()
    run_name = f"{EXTERNAL_PREFIX}{name}"

    def plots(folder: Path) -> None:
        matrix = confusion_matrix(truth, predictions["prediction"].to_numpy(), labels=list(range(NUM_GRADES)))
        plot_confusion_matrix(matrix, folder / "confusion_matrix.png", title=f"{run_name}: confusion matrix")
        plot_reliability_diagram(probabilities, truth, folder / "reliability.png")
        plot_precision_recall_curves(probabilities, truth, folder / "pr_curves.png")

    _log_run(store, bundle, run_name, metrics, [output, skipped_file], {"plots": plots},
             tags=_tags(name, bundle, predictor, fingerprint, datamodule),
             params=_params(cfg, datamodule, predictor, threads))
    _print_result(name, bundle.stage, predictor.precision, metrics, output)
    return metrics


def _evaluate_masks(cfg: DictConfig, bundle, found: str, datamodule, store: _Store) -> dict[str, float]:
    if not isinstance(datamodule, DiscDataModule):
        raise EvaluateError(f"data={cfg.data.get('format')}: {found} is an optic-disc model; score it on a disc "
                            "folder (data=disc_folder data.root=<dir with images/ and masks/>, or "
                            "data=synthetic_disc)")
    datamodule.prepare_data()
    pairs, unpaired = disc_folder_pairs(datamodule.dataset_root)
    name = dataset_name(cfg, datamodule)
    threads = int(cfg.threads) if cfg.threads else default_threads()
    predictor = Predictor(bundle, str(cfg.precision), threads, str(cfg.runtime))
    log.info("Model: %s\nBundle %s (stage %s), %s, %d thread(s); %d image/mask pair(s) of %s",
             found, bundle.folder, bundle.stage, describe_predictor(predictor), threads, len(pairs), name)
    preprocessing = datamodule.pair_cache.preprocessing
    scored = score_pairs(predictor, pairs, preprocessing.mask_threshold, preprocessing.resize_masks,
                         int(cfg.worst_overlays))
    if scored.per_image.empty:
        raise DataValidationError(f"none of the {len(pairs)} image/mask pairs of {name} could be scored",
                                  scored.not_scored["reason"].head(20).tolist(),
                                  fix="check that data.root holds fundus photographs in images/ and their disc "
                                      "masks in masks/")
    not_scored = pd.concat([
        scored.not_scored,
        pd.DataFrame([("", path, "unpaired", reason) for path, reason in unpaired], columns=NOT_SCORED_COLUMNS),
    ], ignore_index=True)
    settings = cfg.bootstrap
    metrics = mask_metrics(scored, int(settings.n_resamples), float(settings.confidence_level), int(settings.seed))
    metrics |= _counts(not_scored, len(scored.per_image), len(pairs), scored.seconds,
                       ("unpaired", "skipped", "failed"))
    output, skipped_file = _write_tables(cfg, bundle, predictor, name, scored.per_image, not_scored)
    fingerprint = pairs_fingerprint(pairs)

    def overlays(folder: Path) -> None:
        for rank, (dice, image_name, overlay) in enumerate(scored.worst):
            target = folder / f"worst_{rank:02d}_dice{dice:.3f}_{Path(image_name).stem}.png"
            cv2.imwrite(str(target), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))

    _log_run(store, bundle, f"{EXTERNAL_PREFIX}{name}", metrics, [output, skipped_file], {"overlays": overlays},
             tags=_tags(name, bundle, predictor, fingerprint, datamodule),
             params=_params(cfg, datamodule, predictor, threads))
    ci = f"[{metrics.get('test/dice_ci_low', float('nan')):.3f}, {metrics.get('test/dice_ci_high', float('nan')):.3f}]"
    log.info("%s, stage %s (%s), at each photograph's size: Dice %.4f %s, IoU %.4f, HD95 %.1f px, %.2f false "
             "detections per image; %d scored, %d unpaired, %d skipped, %d failed; %.1f images/s. Per image: %s",
             name, bundle.stage, predictor.precision, metrics["test/dice"], ci, metrics["test/iou"],
             metrics["test/hd95"], metrics["test/false_detections_per_image"], metrics["external/scored"],
             metrics["external/unpaired"], metrics["external/skipped"], metrics["external/failed"],
             metrics["external/images_per_s"], output)
    return metrics


def _counts(not_scored: pd.DataFrame, scored: int, attempted: int, seconds: float,
            statuses: tuple[str, ...]) -> dict[str, float]:
    counts = not_scored["status"].value_counts()
    return {"external/scored": float(scored),
            "external/images_per_s": attempted / seconds if seconds > 0 else float("nan"),
            **{f"external/{status}": float(counts.get(status, 0)) for status in statuses}}


def _write_tables(cfg: DictConfig, bundle, predictor: Predictor, name: str, table: pd.DataFrame,
                  not_scored: pd.DataFrame) -> tuple[Path, Path]:
    # the model's own hash in the default name: two runs' models evaluated on one set keep their own files
    model_hash = str(bundle.manifest.get("sha256", {}).get(bundle.fp32_path.name, ""))[:8]
    default_name = f"{bundle.stage}-{predictor.precision}-{predictor.runtime}{f'-{model_hash}' if model_hash else ''}.csv"
    output = (Path(str(cfg.output)).expanduser() if cfg.output else
              Path(cfg.paths.output_root).resolve() / "evaluate" / name / default_name)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_csv(table, output)
    skipped_file = output.with_name(f"{output.stem}_not_scored.csv")
    write_csv(not_scored, skipped_file)
    return output, skipped_file


def _tags(name: str, bundle, predictor: Predictor, fingerprint: str, datamodule) -> dict[str, str]:
    return {"external_dataset": name, "stage": str(bundle.stage), "precision": predictor.precision,
            "runtime": predictor.runtime, "data_fingerprint": fingerprint, "synthetic_data": str(datamodule.is_synthetic).lower(),
            "bundle": str(bundle.folder.resolve()), "task": str(bundle.task)}


def _params(cfg: DictConfig, datamodule, predictor: Predictor, threads: int) -> dict[str, str]:
    return {"model": str(cfg.model), "data.format": datamodule.format, "data.root": str(datamodule.dataset_root),
            "precision": predictor.precision, "runtime": predictor.runtime,
            "executed_precision": predictor.executed_precision or predictor.precision, "threads": str(threads)}


def _log_run(store: _Store, bundle, name: str, metrics: dict[str, float], tables: list[Path],
             figures: dict[str, Callable[[Path], None]], tags: dict[str, str], params: dict[str, str]) -> None:
    """A run ``name`` (a child of the model's run when the store has it) with ``metrics``, ``params``, the
    ``tables`` under ``predictions/`` and what each of ``figures`` writes into a folder, under its key."""
    client = MlflowClient(store.tracking_uri)
    run_id, where = _external_run(client, bundle.manifest.get("mlflow_run_id"), name, tags, store.artifact_location)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in metrics.items()],
                     params=[Param(key, value) for key, value in params.items()])
    for table in tables:
        client.log_artifact(run_id, str(table), artifact_path="predictions")
    for artifact_path, write in figures.items():
        with tempfile.TemporaryDirectory() as scratch:
            write(Path(scratch))
            client.log_artifacts(run_id, scratch, artifact_path=artifact_path)
    client.set_terminated(run_id, "FINISHED")
    log.info("MLflow run %s (%s), %s", name, run_id, where)


def _print_result(name: str, stage: str | None, precision: str, metrics: dict[str, float], output: Path) -> None:
    low, high = (metrics.get(f"test/qwk_ci_{end}", float("nan")) for end in ("low", "high"))
    qwk_interval = f"[{low:.3f}, {high:.3f}]"
    log.info("%s, stage %s (%s): QWK %.4f %s, accuracy %.4f, macro F1 %.4f, ECE %.4f; %d scored, %d missing, "
             "%d unlabelled, %d skipped, %d failed; %.1f images/s. Predictions: %s", name, stage, precision,
             metrics["test/qwk"], qwk_interval, metrics["test/acc"], metrics["test/f1_macro"], metrics["test/ece"],
             metrics["external/scored"], metrics["external/missing"], metrics["external/unlabelled"],
             metrics["external/skipped"], metrics["external/failed"], metrics["external/images_per_s"], output)


def exit_status(cfg: DictConfig) -> int:
    """0 when the set was scored; 2 (logged) for a wrong ``model=``/``data=``, a damaged bundle or an unusable
    label file."""
    try:
        run_evaluate(cfg)
    except (EvaluateError, PredictError, BundleError, DataValidationError) as error:
        log.error("%s", error)
        return 2
    return 0


@hydra.main(version_base="1.3", config_path="conf/evaluate", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_onnx_tool_logs()
    sys.exit(exit_status(cfg))


if __name__ == "__main__":
    main()
