"""``make report`` in process: from a store made by real tiny runs, from a hand-made store, the architecture
baselines' selection, and the distillation gain's paired bootstrap on hand-made predictions."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from experiments.glaucoma_chain import run_glaucoma_chain
from experiments.report import run_report
from experiments.report_data import (
    BootstrapSettings,
    NoRunsError,
    baseline_setting,
    baseline_sweep,
    pair_predictions,
    paired_bootstrap_gain,
    student_only_command,
)
from experiments.report_render import format_number
from experiments.tracking import default_artifact_root
from experiments.train_dr import run_dr_distill
from tests.experiments.helpers import compose_config, mlflow_store

#: the figures and deployment bundles of the test stage take time and the report reads none of them
NO_EXTRAS = ["++callbacks.deployment_bundle=null", "++callbacks.grading_explanations=null",
             "++callbacks.segmentation_overlays=null"]
DISTILLED = [*NO_EXTRAS, "debug=tiny", "stages=[teacher,student,student_qat]",
             # an almost untrained tiny student: its int8 grades need not agree with fp32's (the default two
             # QAT epochs: a qat.max_epochs override would make the report's run name too long for its test)
             "qat.callback.min_agreement=0", "qat.callback.max_qwk_drop=2"]
STUDENT_ONLY = [*NO_EXTRAS, "debug=tiny", "experiment=dr_student_only"]
CHAIN = [*NO_EXTRAS, "debug=tiny", "chain.bases=[16,8]", "chain.finishers=[qat,share]",
         "chain.finish_after=[prune-8]", "chain.max_epochs.qat=1", "chain.max_epochs.share=1",
         # an almost untrained tiny network: its int8 masks need not agree with fp32's
         "chain.callbacks.qat.min_mask_dice=0",
         # a comparison stage (as experiment=disc_transformer adds): a row without a base, never a liminal point
         "+model/segmenter@model.compare.transformer=transformer", "chain.compare=[transformer]"]
CHAIN_STAGES = ["base-16", "prune-8", "kd-8", "compare-transformer", "qat-prune-8", "share-prune-8"]
#: one job of the architecture-baseline sweep, as its multirun would launch it
BASELINE = [*NO_EXTRAS, "experiment=dr_baselines", "debug=tiny", "model/baseline=efficientnet_b0"]
FEW_RESAMPLES = "report.bootstrap.n_resamples=200"


def _report(project: Path, monkeypatch, overrides: list[str], out: str) -> tuple[dict[str, Path], str, str]:
    monkeypatch.setenv("PROJECT_ROOT", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # the Hydra run directory, unless the overrides name report.output_dir
    cfg = compose_config("report", overrides, project / "outputs" / "report" / out)
    files = run_report(cfg)
    return files, files["html"].read_text(), files["markdown"].read_text()


def _section(markdown: str, title: str) -> str:
    """The Markdown under the heading ``title``, up to the next heading of the same or a higher level."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(title)}", line)), None)
    assert start is not None, f"no section {title!r} in the report"
    level = len(lines[start].split(" ")[0])
    end = next((i for i in range(start + 1, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start + 1:end])


def _row(markdown: str, run_id: str) -> str:
    """The Markdown table row whose last cell links to ``run_id``."""
    rows = [line for line in markdown.splitlines() if line.startswith("|") and f"[{run_id}]" in line]
    assert len(rows) == 1, f"{len(rows)} table rows for run {run_id}"
    return rows[0]


# ------------------------------------------------------------------------------ a store made by tiny runs
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Iterator[Path]:
    """A project whose MLflow store holds a distilled dr-distill run (teacher, student, student_qat), a later
    student-only run on the same data, a glaucoma chain with both arms and both finishers, and one job of the
    architecture-baseline sweep."""
    project = tmp_path_factory.mktemp("tiny_project")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PROJECT_ROOT", str(project))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs = project / "outputs" / "dr-distill" / "runs"
        run_dr_distill(compose_config("train_dr", DISTILLED, runs / "distilled"))
        run_dr_distill(compose_config("train_dr", STUDENT_ONLY, runs / "student_only"))
        run_glaucoma_chain(compose_config("glaucoma_chain", CHAIN,
                                          project / "outputs" / "glaucoma-iterations" / "runs" / "chain"))
        run_dr_distill(compose_config("train_dr", BASELINE,
                                      project / "outputs" / "dr-baselines" / "multiruns" / "0"))
    yield project
    # pytest keeps tmp_path_factory folders to the end of the session, and this one holds hundreds of MB
    shutil.rmtree(project, ignore_errors=True)


def _parents(client: MlflowClient, experiment: str) -> dict[str, object]:
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {run.info.run_name: run for run in runs if MLFLOW_PARENT_RUN_ID not in run.data.tags}


def _children(client: MlflowClient, parent) -> dict[str, object]:
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
    return {run.info.run_name: run for run in runs}


def test_report_of_tiny_runs_has_a_row_for_every_stage_run(tiny_store: Path, monkeypatch):
    files, page, markdown = _report(tiny_store, monkeypatch, [FEW_RESAMPLES], "report_a")
    client = mlflow_store(tiny_store)
    distilled = next(run for name, run in _parents(client, "dr-distill").items() if "student_qat" in name)
    chain = next(iter(_parents(client, "glaucoma-iterations").values()))
    dr_children, chain_children = _children(client, distilled), _children(client, chain)
    assert set(dr_children) == {"teacher", "student", "student_qat"}
    assert set(chain_children) == set(CHAIN_STAGES)

    # the distilled run is the default, although the student-only run is newer
    assert f"[{distilled.info.run_id}]" in _section(markdown, "Selected runs")
    dr_section = _section(markdown, "Diabetic retinopathy grading (dr-distill)")
    chain_section = _section(markdown, "Optic-disc segmentation (glaucoma-iterations)")
    for section, children in ((dr_section, dr_children), (chain_section, chain_children)):
        for stage, child in children.items():
            assert child.info.run_id in page and f"{stage}</td>" in page
            row = _row(section, child.info.run_id)
            assert f"| {stage} " in row
            assert f"| {format_number(child.data.metrics['model/params'])} " in row
            assert f"/#/experiments/{child.info.experiment_id}/runs/{child.info.run_id})" in row
    assert "| int8 " in _row(dr_section, dr_children["student_qat"].info.run_id)
    assert "| fp32 " in _row(dr_section, dr_children["teacher"].info.run_id)
    assert "| int8 " in _row(chain_section, chain_children["qat-prune-8"].info.run_id)
    assert "| 4-bit shared (k=16) " in _row(chain_section, chain_children["share-prune-8"].info.run_id)
    # the comparison's base cell is empty (its tag says "-"), its arm "compare"
    compare_row = _row(chain_section, chain_children["compare-transformer"].info.run_id)
    assert re.match(r"\| compare-transformer +\| compare +\| +\| fp32 ", compare_row), compare_row
    qwk = dr_children["student"].data.metrics["test/qwk"]
    assert f"| {format_number(qwk)} " in _row(dr_section, dr_children["student"].info.run_id)

    # the baseline job: a row of the architecture baselines, beside the distilled student for scale
    (baseline,) = _parents(client, "dr-baselines").values()
    assert set(_children(client, baseline)) == {"baseline"}
    baselines = _section(markdown, "Architecture baselines")
    row = _row(baselines, baseline.info.run_id)
    assert re.match(r"\| efficientnet_b0 +\| none +\| ", row), row
    assert f"| {format_number(baseline.data.metrics['baseline/test/qwk'])} " in row
    assert f"| {format_number(baseline.data.metrics['baseline/model/params'])} " in row
    assert _row(baselines, dr_children["student"].info.run_id).startswith("| student (distilled): ")
    shared = " ".join(o for o in BASELINE if not o.startswith("model/baseline="))
    assert f'Rerun the sweep (every backbone): `make dr-distill ARGS="{shared}"`' in baselines

    # the chain's own liminal verdict: the base it logged, for every arm
    liminal = _section(markdown, f"Liminal point of {chain.info.run_name}")
    for key, base in chain.data.metrics.items():
        if key.startswith("liminal/") and key != "liminal/base_base":
            arm = key.removeprefix("liminal/").removesuffix("_base")
            assert re.search(rf"^\| {arm} +\| \S+ +\| {int(base)} ", liminal, flags=re.M), liminal
    assert not re.search(r"^\| compare", liminal, flags=re.M)  # a comparison is never a liminal point

    # self-contained HTML, Markdown beside its figure, in the Hydra run directory
    assert files["html"].parent == tiny_store / "outputs" / "report" / "report_a"
    assert (files["markdown"].parent / "pareto.png").is_file() and "](pareto.png)" in markdown
    assert page.count('src="data:image/png;base64,') >= 1
    assert "<link" not in page and "<script" not in page and not re.search(r'src="(?!data:)', page)

    # logged to the report experiment, named after the selected runs
    (logged,) = client.search_runs([client.get_experiment_by_name("report").experiment_id])
    # the two names are longer together than MLflow's 250 characters: cut, and the tag keeps both ids
    assert logged.info.run_name.startswith(f"report[{distilled.info.run_name} + glau")
    assert len(logged.info.run_name) == 250 and logged.info.run_name.endswith("...]")
    assert logged.data.tags["report.runs"] == f"{distilled.info.run_id},{chain.info.run_id}"
    assert logged.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "report")} >= {
        "report/report.html", "report/report.md", "report/pareto.png"}


def test_distillation_gain_of_tiny_runs_finds_the_student_only_run(tiny_store: Path, monkeypatch):
    overrides = [FEW_RESAMPLES, "report.log_to_mlflow=false"]
    _, _, markdown = _report(tiny_store, monkeypatch, overrides, "report_b")
    client = mlflow_store(tiny_store)
    student_only = next(run for name, run in _parents(client, "dr-distill").items() if "student_only" in name)
    distilled = next(run for name, run in _parents(client, "dr-distill").items() if "student_qat" in name)
    gain = _section(markdown, "Distillation gain")
    assert f"(parent run {student_only.info.run_id})" in gain
    students = [_children(client, parent)["student"] for parent in (distilled, student_only)]
    has_predictions = [any(a.path == "predictions/test_predictions.csv"
                           for a in client.list_artifacts(s.info.run_id, "predictions")) for s in students]
    if all(has_predictions):
        assert "95% CI low" in gain and "No distillation gain" not in gain
    else:  # runs made before the per-image predictions were logged: the section says what to rerun
        lacking = students[has_predictions.index(False)]
        assert f"The student run {lacking.info.run_id} of" in gain
        assert "has no predictions/test_predictions.csv" in gain
        assert "95% CI low" not in gain


def test_explicit_runs_compare_two_runs_of_a_pipeline(tiny_store: Path, tmp_path: Path, monkeypatch):
    client = mlflow_store(tiny_store)
    parents = _parents(client, "dr-distill")
    student_only = next(run for name, run in parents.items() if "student_only" in name)
    distilled = next(run for name, run in parents.items() if "student_qat" in name)
    teacher = _children(client, distilled)["teacher"]  # a stage's run stands for its parent
    files, _, markdown = _report(tiny_store, monkeypatch, [
        FEW_RESAMPLES, "report.log_to_mlflow=false", "report.bench=null", f"report.output_dir={tmp_path}",
        f"report.runs=[{student_only.info.run_id},{teacher.info.run_id}]"], "report_e")
    assert files["html"] == tmp_path / "report.html"
    dr = _section(markdown, "Diabetic retinopathy grading (dr-distill)")
    for parent in (student_only, distilled):  # each stage's row names its parent run
        for child in _children(client, parent).values():
            assert f"| [{parent.info.run_name}](" in _row(dr, child.info.run_id)
    assert "trained its student without a teacher: it is the counterpart" in markdown
    assert "Optic-disc segmentation" not in markdown and "Liminal point" not in markdown  # not selected
    assert f"(parent run {student_only.info.run_id})" in _section(markdown, "Distillation gain")


def test_an_unknown_experiment_or_a_missing_store_is_a_clear_error(tiny_store: Path, tmp_path: Path,
                                                                   monkeypatch):
    overrides = ["report.experiments.dr=no-such-dr", "report.experiments.glaucoma=no-such-chain"]
    with pytest.raises(NoRunsError, match="no finished no-such-dr or no-such-chain run.*make dr-distill"):
        _report(tiny_store, monkeypatch, [*overrides, "report.baselines=null"], "report_c")
    # a store with nothing but architecture baselines: a report of them alone, saying what else to run
    files, _, markdown = _report(tiny_store, monkeypatch, overrides, "report_baselines_only")
    (baseline,) = _parents(mlflow_store(tiny_store), "dr-baselines").values()
    assert baseline.info.run_id in _section(markdown, "Architecture baselines")
    assert "student (distilled)" not in markdown and "Distillation gain" not in markdown
    assert "No finished no-such-dr run in the store: run `make dr-distill` for its section." in markdown
    assert files["html"].is_file()
    with pytest.raises(NoRunsError, match="no run 0123abc in the MLflow store"):
        _report(tiny_store, monkeypatch, ["report.runs=[0123abc]"], "report_d")
    empty = tmp_path / "fresh_clone"
    with pytest.raises(NoRunsError, match=r"no MLflow store at .*mlflow.db: run `make dr-distill`"):
        _report(empty, monkeypatch, [], "report")
    assert not (empty / "mlruns").exists()  # the report did not create an empty store


# ----------------------------------------------------------------------------------- a hand-made store
GRADES = np.array([0, 1, 2, 3, 4] * 8)
#: off by one grade on every image (grade 4 called 3)
OFF_BY_ONE = np.where(GRADES < 4, GRADES + 1, 3)


def _predictions(labels: np.ndarray, predictions: np.ndarray,
                 images: list[str] | None = None) -> pd.DataFrame:
    """The predictions file's columns (callbacks.classification_diagnostics.predictions_table); the probabilities put all mass on the prediction."""
    images = images or [f"img{i:03d}.png" for i in range(len(labels))]
    frame = pd.DataFrame({"image": images, "label": labels, "prediction": predictions})
    for grade in range(5):
        frame[f"prob_{grade}"] = (predictions == grade).astype(float)
    return frame


def _splits(test_ids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": test_ids + ["train_a", "train_b"], "patient": test_ids + ["a", "b"],
                         "label": 0, "split": ["test"] * len(test_ids) + ["train", "train"], "path": "x"})


#: the timm backbone of each model/baseline choice (experiments/conf/model/baseline/)
BASELINE_BACKBONES = {"efficientnet_b0": "efficientnet_b0", "resnet50": "resnet50",
                      "resnext50_32x4d": "resnext50_32x4d", "convnext_k5": "convnext_tiny",
                      "convnext_k7": "convnext_tiny"}
#: short names of the metrics a baseline run logs (under ``baseline/`` on its parent)
BASELINE_KEYS = {"qwk": "test/qwk", "acc": "test/acc", "f1": "test/f1_macro", "ece": "test/ece",
                 "params": "model/params", "macs": "model/macs", "size": "model/size_bytes",
                 "latency": "model/latency_ms_median", "pipeline": "pipeline/latency_ms_median"}
#: the sweeps of the hand-made store's baseline experiment
OLD_SWEEP, SWEEP = "experiment=dr_baselines data=eyepacs", "experiment=dr_baselines debug=smoke"
CONVNEXT_K5 = {"qwk": 0.55, "acc": 0.625, "f1": 0.5, "ece": 0.125, "params": 27_664_997, "macs": 808_770_048,
               "size": 110_715_675, "latency": 40.5, "pipeline": 42.25, "majority": 0.4}


class _Store:
    """Writes runs into an MLflow store the way the entry points leave them."""

    def __init__(self, project: Path):
        self.project = project
        self.client = mlflow_store(project)
        self.clock = 1_700_000_000_000
        self.files = project / "files"

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=default_artifact_root(self.project))

    def run(self, experiment: str, name: str, parent=None, tags: Mapping[str, str] | None = None,
            params: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
            artifacts: Mapping[str, pd.DataFrame] | None = None, status: str = "FINISHED"):
        self.clock += 1000  # distinct start times: "latest" must not depend on creation speed
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent is not None:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent.info.run_id
        run = self.client.create_run(experiment, start_time=self.clock, tags=all_tags)
        run_id = run.info.run_id
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in (params or {}).items()],
                              metrics=[Metric(k, float(v), self.clock, 0)
                                       for k, v in (metrics or {}).items()])
        for path, frame in (artifacts or {}).items():
            local = self.files / run_id / path
            local.parent.mkdir(parents=True, exist_ok=True)
            frame.to_csv(local, index=False)
            self.client.log_artifact(run_id, str(local), artifact_path=str(Path(path).parent))
        if status != "RUNNING":
            self.client.set_terminated(run_id, status)
        return self.client.get_run(run_id)

    def baseline_run(self, experiment: str, choice: str, fingerprint: str, shared: str,
                     metrics: Mapping[str, float], pretrained_path: str = "None", status: str = "FINISHED"):
        """A job of experiment=dr_baselines: the parent (``baseline/*`` metrics, the majority-class floor) and
        its ``baseline`` child. ``shared``: the sweep's overrides, after the job's ``model/baseline=choice``
        (a ``+`` in ``choice`` is kept, as Hydra records it)."""
        overrides = f"model/baseline={choice} {shared}" if "=" not in choice else f"{choice} {shared}"
        choice = choice.split("=")[-1]
        tags = {"overrides": overrides, "data_fingerprint": fingerprint, "synthetic_data": "true"}
        params = {"model.baseline.backbone": BASELINE_BACKBONES[choice], "model.baseline.pretrained": "none",
                  "model.baseline.pretrained_path": pretrained_path}
        if choice.startswith("convnext_k"):
            params["model.baseline.backbone_kwargs.kernel_sizes"] = choice.removeprefix("convnext_k")
        parent_metrics = {f"baseline/{BASELINE_KEYS[k]}": v for k, v in metrics.items() if k != "majority"}
        if "majority" in metrics:
            parent_metrics["majority_class/test_acc"] = metrics["majority"]
        name = f"dr-baselines[{','.join(sorted(overrides.split()))}]"
        parent = self.run(experiment, name, tags=tags, params=params, metrics=parent_metrics, status=status)
        child_metrics = {BASELINE_KEYS[k]: v for k, v in metrics.items() if k != "majority"}
        self.run(experiment, "baseline", parent, tags, params, child_metrics, status=status)
        return parent

    def ablation_run(self, experiment: str, arm: str, fingerprint: str, shared: str, predictions: pd.DataFrame):
        """A job of experiment=dr_ablation: a parent with the ``ablation`` param and its ``student`` child."""
        tags = {"overrides": f"ablation={arm} {shared}", "data_fingerprint": fingerprint}
        parent = self.run(experiment, f"dr-ablation[ablation={arm}]", tags=tags, params={"ablation": arm})
        self.run(experiment, "student", parent, tags, {"ablation": arm}, {"test/qwk": 0.4},
                 {"predictions/test_predictions.csv": predictions})
        return parent

    def dr_run(self, experiment: str, name: str, fingerprint: str, distilled: bool,
               predictions: pd.DataFrame | None, test_ids: list[str]):
        tags = {"data_fingerprint": fingerprint,
                "overrides": "(none)" if distilled else "experiment=dr_student_only"}
        parent = self.run(experiment, name, tags=tags)
        if distilled:
            self.run(experiment, "teacher", parent, tags, metrics={"test/qwk": 0.5, "model/params": 1000})
        params = {"teacher_checkpoint": "/t/best.ckpt" if distilled else "None",
                  "alpha_start": 0.2 if distilled else 0.0, "alpha_end": 0.8 if distilled else 0.0,
                  "model.student.backbone": "tf_efficientnet_lite0", "model.student.pretrained": "lite"}
        artifacts = {"run/splits.csv": _splits(test_ids)}
        if predictions is not None:
            artifacts["predictions/test_predictions.csv"] = predictions
        metrics = {"test/qwk": 0.4, "model/params": 500}
        self.run(experiment, "student", parent, tags, params, metrics, artifacts)
        return parent


@pytest.fixture(scope="module")
def hand_made_store(tmp_path_factory) -> dict[str, object]:
    """``dr-paired``: a distilled run right on every test image and a student-only run off by one grade on
    every image, same data and split; ``dr-lonely``: a distilled run whose only student-only run used other
    data; ``bench-hand``: a make-bench run; ``dr-baselines-hand``: two sweeps of architecture baselines."""
    project = tmp_path_factory.mktemp("hand_made_project")
    store = _Store(project)
    ids = [f"img{i:03d}.png" for i in range(len(GRADES))]
    paired = store.experiment("dr-paired")
    runs = {"project": project,
            "paired_distilled": store.dr_run(paired, "distilled", "fp1", True, _predictions(GRADES, GRADES),
                                             ids)}
    # the student-only file lists the images in another order: pairing is by image name
    shuffled = _predictions(GRADES, OFF_BY_ONE).sample(frac=1.0, random_state=0)
    runs["paired_student_only"] = store.dr_run(paired, "student-only", "fp1", False, shuffled, ids)
    lonely = store.experiment("dr-lonely")
    runs["lonely_student_only"] = store.dr_run(lonely, "other data, no teacher", "fp2", False,
                                               _predictions(GRADES, OFF_BY_ONE), ids)
    runs["lonely_distilled"] = store.dr_run(lonely, "distilled alone", "fp1", True,
                                            _predictions(GRADES, GRADES), ids)
    bench = pd.DataFrame({"pipeline": ["dr", "dr"], "model": ["student", "student"],
                          "backend": ["eager", "ort_int8"], "source": "trained", "params": [500, 500],
                          "file_bytes": [2e6, 5e5], "latency_ms_median": [10.0, 3.0],
                          "latency_vs_fp32": [1.0, 0.3], "quality_metric": "qwk", "quality": [0.4, 0.39],
                          "quality_delta": [0.0, -0.01], "agreement": [1.0, 0.95], "error": ""})
    runs["bench"] = store.run(store.experiment("bench-hand"), "bench",
                              tags={"dr_source": "trained: somewhere"}, artifacts={"bench/bench.csv": bench})
    # architecture baselines, oldest first: a sweep on other data (fp0), then the sweep on the distilled
    # run's data (fp1) with a job of another setting in between, a rerun of resnet50 (the overrides in
    # another order, the group added with +), and the newest of all still running on a third data set
    baselines = runs["baselines_experiment"] = store.experiment("dr-baselines-hand")
    runs["old_efficientnet"] = store.baseline_run(baselines, "efficientnet_b0", "fp0", OLD_SWEEP,
                                                  {"qwk": 0.7, "majority": 0.5})
    runs["old_resnet"] = store.baseline_run(baselines, "resnet50", "fp0", OLD_SWEEP,
                                            {"qwk": 0.65, "majority": 0.5})
    runs["efficientnet"] = store.baseline_run(baselines, "efficientnet_b0", "fp1", SWEEP,
                                              {"qwk": 0.3, "params": 4_013_953, "majority": 0.4})
    runs["first_resnet"] = store.baseline_run(baselines, "resnet50", "fp1", SWEEP,
                                              {"qwk": 0.1, "majority": 0.4})
    runs["convnext"] = store.baseline_run(baselines, "convnext_k5", "fp1", SWEEP, CONVNEXT_K5)
    runs["longer"] = store.baseline_run(baselines, "resnext50_32x4d", "fp1", f"{SWEEP} trainer.max_epochs=9",
                                        {"qwk": 0.8, "majority": 0.4})
    runs["resnet"] = store.baseline_run(baselines, "+model/baseline=resnet50", "fp1",
                                        "debug=smoke experiment=dr_baselines", {"qwk": 0.42, "majority": 0.4},
                                        pretrained_path="/weights/resnet50_a1.pth")
    runs["running"] = store.baseline_run(baselines, "convnext_k7", "fp2", SWEEP, {"qwk": 0.9},
                                         status="RUNNING")
    # experiment=dr_ablation: an older sweep on other data (all arms right), then the newest sweep, where removing
    # KD or the topological branch costs a grade on every image and removing CBAM changes nothing
    ablation = store.experiment("dr-ablation-hand")
    for arm in ("full", "no_kd"):
        store.ablation_run(ablation, arm, "fp0", "experiment=dr_ablation", _predictions(GRADES, GRADES))
    runs["ablation"] = {
        arm: store.ablation_run(ablation, arm, "fp1", "experiment=dr_ablation data=aptos",
                                _predictions(GRADES, GRADES if arm in ("full", "no_cbam") else OFF_BY_ONE))
        for arm in ("no_topology", "full", "no_kd", "no_cbam")}
    return runs


HAND = ["report.experiments.glaucoma=no-chain-here", "report.experiments.bench=bench-hand", FEW_RESAMPLES]


def test_gain_through_the_store_on_hand_made_predictions(hand_made_store, monkeypatch):
    project = hand_made_store["project"]
    _, page, markdown = _report(project, monkeypatch, [*HAND, "report.experiments.dr=dr-paired"], "paired")
    gain = _section(markdown, "Distillation gain")
    assert f"(parent run {hand_made_store['paired_student_only'].info.run_id})" in gain
    assert "same 40 test images" in gain
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in gain.splitlines() if line.startswith("| test ")}
    # right on every image vs off by one on every image: accuracy and macro F1 1 vs 0 in every resample;
    # QWK 1 vs 12/17 (hand-computed: 1 - 2.5 / 8.5 with weights (i - j)^2 / 16)
    assert rows["test accuracy"] == ["1", "0", "1", "1", "1"]
    assert rows["test macro F1"] == ["1", "0", "1", "1", "1"]
    with_teacher, without, gain_qwk, low, high = (float(v) for v in rows["test QWK"])
    assert with_teacher == 1 and without == pytest.approx(12 / 17, abs=1e-4)
    assert gain_qwk == pytest.approx(5 / 17, abs=1e-4) and 0 < low <= gain_qwk <= high
    # the hand-made store has no chain: the report says so instead of failing
    assert "No finished no-chain-here run in the store: run `make glaucoma-iterations`" in markdown
    assert "Optic-disc segmentation" not in page
    # nor an experiment dr-baselines: no baselines section, and no note (it is optional)
    assert "Architecture baselines" not in page and "baseline" not in _section(markdown, "Selected runs")
    # the bench section: its rows with their precision
    bench = _section(markdown, "CPU inference backends (make bench)")
    assert hand_made_store["bench"].info.run_id in bench and "| int8 (ONNX Runtime) " in bench
    assert "Measured: dr: trained: somewhere." in bench


def test_ablation_table_compares_every_arm_with_the_full_student(hand_made_store, monkeypatch):
    project = hand_made_store["project"]
    _, _, markdown = _report(project, monkeypatch, [*HAND, "report.experiments.dr=dr-paired",
                                                    "report.experiments.ablation=dr-ablation-hand"], "ablation")
    ablation = _section(markdown, "Ablation: which part of the student helps")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in ablation.splitlines() if line.startswith("| ") and "arm" not in line and "---" not in line}
    # the newest sweep only (fp1), in the order full, no_kd, no_cbam, no_topology
    assert list(rows) == ["full", "no_kd", "no_cbam", "no_topology"]
    for arm in ("full", "no_cbam"):
        assert rows[arm][:3] == ["1", "1", "1"]
    assert rows["no_cbam"][3:6] == ["0", "0", "0"]  # QWK - full and its interval: no difference
    qwk, _, _, d_qwk, low, high, d_acc, _ = (float(v) for v in rows["no_kd"])
    assert qwk == pytest.approx(12 / 17, abs=1e-4) and d_qwk == pytest.approx(-5 / 17, abs=1e-4)
    assert low <= d_qwk <= high < 0 and d_acc == -1
    assert "40 test images" in ablation


def test_missing_counterpart_gives_the_run_to_make(hand_made_store, monkeypatch):
    project = hand_made_store["project"]
    _, _, markdown = _report(project, monkeypatch, [*HAND, "report.experiments.dr=dr-lonely"], "lonely")
    gain = _section(markdown, "Distillation gain")
    assert "No distillation gain: No finished dr-lonely run trained the student without a teacher" in gain
    assert 'Make one with `make dr-distill ARGS="experiment=dr_student_only"`' in gain
    other = hand_made_store["lonely_student_only"]
    assert f"not a counterpart: other data, no teacher ({other.info.run_id}): other data (data_fingerprint " \
           "fp2" in gain
    assert "CI low" not in gain
    # naming the run explicitly does not override the data check
    named = [*HAND, "report.experiments.dr=dr-lonely", f"report.student_without_teacher={other.info.run_id}"]
    _, _, markdown = _report(project, monkeypatch, named, "named")
    gain = _section(markdown, "Distillation gain")
    assert f"report.student_without_teacher={other.info.run_id}: other data" in gain


# ------------------------------------------------------------------------------------ the bootstrap itself
SETTINGS = BootstrapSettings(n_resamples=100, seed=1)


def test_identical_predictions_give_no_gain_and_a_zero_interval():
    predictions = np.array([0, 1, 1, 2, 3, 4, 4, 0, 2, 3] * 3)
    labels = np.array([0, 1, 2, 2, 3, 4, 3, 0, 1, 3] * 3)
    frame = _predictions(labels, predictions)
    table = paired_bootstrap_gain(pair_predictions(frame, frame), 5, SETTINGS).set_index("metric")
    assert (table["gain"] == 0).all() and (table["ci_low"] == 0).all() and (table["ci_high"] == 0).all()
    assert table.loc["test accuracy", "with_teacher"] == pytest.approx(21 / 30)  # 7 of 10 right, three times


def test_a_student_better_on_every_image_has_an_interval_above_zero():
    with_teacher = _predictions(GRADES, GRADES)
    without = _predictions(GRADES, OFF_BY_ONE)
    table = paired_bootstrap_gain(pair_predictions(with_teacher, without), 5, SETTINGS).set_index("metric")
    assert (table["ci_low"] > 0).all()
    assert table.loc["test QWK", "gain"] == pytest.approx(5 / 17)
    again = paired_bootstrap_gain(pair_predictions(with_teacher, without), 5, SETTINGS)
    assert again["ci_low"].tolist() == table["ci_low"].tolist()  # seeded


def test_pairing_refuses_other_images_or_other_labels():
    frame = _predictions(GRADES, GRADES)
    other_images = _predictions(GRADES, GRADES, [f"other{i}.png" for i in range(len(GRADES))])
    with pytest.raises(ValueError, match="tested on different images"):
        pair_predictions(frame, other_images)
    relabelled = GRADES.copy()
    relabelled[[1, 7, 13]] = 0
    with pytest.raises(ValueError, match="different true grades for 3 images"):
        pair_predictions(frame, _predictions(relabelled, GRADES))
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['prediction'\]"):
        pair_predictions(frame, frame.drop(columns=["prediction"]))


@pytest.mark.parametrize(("overrides", "command"), [
    ("(none)", 'make dr-distill ARGS="experiment=dr_student_only"'),
    ("data=aptos data.root=/d", 'make dr-distill ARGS="data=aptos data.root=/d experiment=dr_student_only"'),
    ("experiment=dr_distill_paper data.root=/d",
     'make dr-distill ARGS="experiment=dr_distill_paper data.root=/d distill=none stages=[student]"'),
])
def test_the_student_only_command_keeps_the_distilled_runs_settings(overrides: str, command: str):
    assert student_only_command(overrides) == command


# ------------------------------------------------------------------------------- architecture baselines
def _baselines(store: Mapping[str, object], setting, experiment: str = "dr-baselines-hand"):
    client = mlflow_store(store["project"])
    return baseline_sweep(client, setting, experiment, "the hand-made store", ui_url="http://ui")


def _ids(*runs) -> list[str]:
    return [run.info.run_id for run in runs]


def test_latest_baselines_are_the_newest_sweep_one_run_per_backbone(hand_made_store):
    sweep = _baselines(hand_made_store, "latest")
    # the newest finished run fixes the sweep (fp1, its overrides without the backbone choice): the resnet50
    # rerun replaces the first resnet50 run; the sweep on fp0, the job with another setting and the running
    # job are left out; best test QWK first
    assert list(sweep.table["parent_id"]) == _ids(*(hand_made_store[k] for k in ("convnext", "resnet",
                                                                                  "efficientnet")))
    assert _ids(*sweep.runs) == list(sweep.table["parent_id"]) and not sweep.explicit
    assert list(sweep.table["qwk"]) == [0.55, 0.42, 0.3]
    assert list(sweep.table["choice"]) == ["convnext_k5", "resnet50", "efficientnet_b0"]
    assert list(sweep.table["backbone"]) == ["convnext_tiny k=5", "resnet50", "efficientnet_b0"]
    assert list(sweep.table["pretrained"]) == ["none", "file resnet50_a1.pth", "none"]
    # the command of the sweep's newest invocation, in the order it was typed, without the backbone choice
    assert sweep.commands == ['make dr-distill ARGS="debug=smoke experiment=dr_baselines"']
    assert sweep.majority_accuracy == [0.4]
    assert sweep.students.empty  # no dr-distill run was selected


def test_explicit_baselines_are_exactly_the_named_runs(hand_made_store):
    old, convnext = hand_made_store["old_resnet"], hand_made_store["convnext"]
    child = _children(mlflow_store(hand_made_store["project"]), convnext)["baseline"]
    # a stage's run stands for its parent; one string of ids separated by a comma and spaces
    sweep = _baselines(hand_made_store, f"{child.info.run_id}, {old.info.run_id} {convnext.info.run_id}")
    assert sweep.explicit and list(sweep.table["parent_id"]) == _ids(old, convnext)  # 0.65 before 0.55
    # two sweeps (other data): a command and a majority-class floor each, the newer sweep first
    assert sweep.commands == ['make dr-distill ARGS="experiment=dr_baselines debug=smoke"',
                              'make dr-distill ARGS="experiment=dr_baselines data=eyepacs"']
    assert sweep.majority_accuracy == [0.4, 0.5]
    # a running run is shown when named (collect_report adds a note that it is not finished)
    running = _baselines(hand_made_store, [hand_made_store["running"].info.run_id])
    assert list(running.table["qwk"]) == [0.9] and running.runs[0].info.status == "RUNNING"


def test_unknown_or_non_baseline_ids_are_errors_and_no_baselines_no_section(hand_made_store):
    with pytest.raises(NoRunsError, match=r"report.baselines: there is no run 0123abc in the MLflow store"):
        _baselines(hand_made_store, ["0123abc"])
    distilled = hand_made_store["paired_distilled"]
    with pytest.raises(NoRunsError, match=rf"report.baselines: run {distilled.info.run_id} .* trained no "
                                          "architecture baseline"):
        _baselines(hand_made_store, [distilled.info.run_id])
    assert _baselines(hand_made_store, "latest", experiment="no-such-baselines") is None
    assert _baselines(hand_made_store, None) is None


@pytest.mark.parametrize(("value", "setting"), [
    (None, None), ("null", None), ("", None), ([], None), ("latest", "latest"), (["latest"], "latest"),
    ("a1,b2 c3", ["a1", "b2", "c3"]), (["a1", " b2 "], ["a1", "b2"]),
])
def test_the_baselines_option_reads_latest_ids_or_nothing(value, setting):
    assert baseline_setting(value) == setting


def test_baselines_section_ranks_the_sweep_with_the_distilled_student(hand_made_store, monkeypatch):
    project = hand_made_store["project"]
    # dr-lonely: a distilled run on the sweep's data without a counterpart (no bootstrap to wait for)
    overrides = [*HAND, "report.experiments.dr=dr-lonely", "report.experiments.baselines=dr-baselines-hand",
                 "report.bench=null", "report.log_to_mlflow=false"]
    _, page, markdown = _report(project, monkeypatch, overrides, "baselines")
    section = _section(markdown, "Architecture baselines")
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in section.splitlines()
            if line.startswith("| ") and "](http://" in line]
    student = _children(mlflow_store(project), hand_made_store["lonely_distilled"])["student"]
    # one row per backbone of the latest sweep and the distilled student (test QWK 0.4), best QWK first
    assert [row[0] for row in rows] == ["convnext_tiny k=5", "resnet50", "student (distilled): "
                                        "tf_efficientnet_lite0", "efficientnet_b0"]
    assert [row[-1].split("]")[0].lstrip("[") for row in rows] == _ids(
        hand_made_store["convnext"], hand_made_store["resnet"], student, hand_made_store["efficientnet"])
    # by hand: MACs in millions (808,770,048 -> 808.8), bytes in MB (110,715,675 -> 110.7)
    assert rows[0][:-1] == ["convnext_tiny k=5", "none", "0.55", "0.625", "0.5", "0.125", "27,664,997",
                            "808.8", "110.7", "40.5", "42.25"]
    assert rows[2][1:3] == ["lite", "0.4"] and rows[2][6] == "500"  # the student run's params and metrics
    assert "Majority-class floor: always predicting the test split's most frequent grade scores test " \
           "accuracy 0.4" in section
    assert 'Rerun the sweep (every backbone): `make dr-distill ARGS="debug=smoke experiment=dr_baselines"`' \
           in section
    assert "the row marked \"student (distilled)\" is the student of distilled alone (" in section
    assert "<h2>Architecture baselines</h2>" in page and "convnext_tiny k=5</td>" in page
    assert "data fingerprint" not in section  # all on one data set

    # two runs of two sweeps named by id: each row says its data, the text each sweep's command
    old = hand_made_store["old_resnet"]
    named = [*overrides, f"report.baselines=[{old.info.run_id},{hand_made_store['convnext'].info.run_id}]"]
    _, _, markdown = _report(project, monkeypatch, named, "named_baselines")
    section = _section(markdown, "Architecture baselines")
    assert re.search(rf"^\| resnet50 .*\| fp0 +\| \[{old.info.run_id}\]", section, flags=re.M), section
    assert "These runs come from 2 sweeps" in section and "test accuracy 0.4, 0.5" in section
    assert '`make dr-distill ARGS="experiment=dr_baselines data=eyepacs"`' in section
