"""Diabetic-retinopathy grading DataModule: APTOS 2019, EyePACS, or synthetic fundus photographs."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from albumentations.pytorch import ToTensorV2
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from datamodules.dr_index import (
    IMAGE_FOLDERS,
    NUM_GRADES,
    read_aptos_index,
    read_eyepacs_index,
    write_synthetic_dr_dataset,
)
from datamodules.errors import DataValidationError
from datamodules.fundus import (
    PREPROCESS_VERSION,
    SKIPPED_COLUMNS,
    FundusPreprocessing,
    PreprocessedImageCache,
    atomic_save_npy,
    check_preprocessing_spec,
    data_fingerprint,
    drop_unusable,
    load_npy_checked,
    source_key,
)
from datamodules.photograph import PhotographCheck, read_photograph
from datamodules.splits import SPLITS, check_splits, stratified_group_split, with_split_column
from datamodules.synthetic import synthetic_data_banner
from datamodules.topology import (
    PersistenceImager,
    TopologyConfig,
    image_diagrams,
    pack_diagrams,
    unpack_diagrams,
)
from lightning_modules.losses import class_counts, effective_number_weights, inverse_frequency_sample_weights

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("synthetic", "aptos", "eyepacs", "multi")
#: the formats a source of data=multi may have
SOURCE_FORMATS = ("aptos", "eyepacs")
SYNTHETIC_BANNER = synthetic_data_banner("data=aptos|eyepacs data.root=<folder>")


def camera_transforms() -> list[A.BasicTransform]:
    """What differs between cameras and uploads besides colour: focus and resolution (blur or a down- and
    up-scaled image), exposure curve (gamma), local contrast enhancement (CLAHE, as some archives apply before
    sharing: eyepacs-dev's uploader did) and compression (JPEG quality 40-95). Each on 30% of images."""
    return [
        A.OneOf([A.GaussianBlur(sigma_limit=(0.3, 1.5)), A.Downscale(scale_range=(0.5, 0.9))], p=0.3),
        A.RandomGamma(gamma_limit=(70, 140), p=0.3),
        A.CLAHE(clip_limit=(1.0, 4.0), tile_grid_size=(8, 8), p=0.3),
        A.ImageCompression(quality_range=(40, 95), p=0.3),
    ]


def training_transform(image_size: int, camera_augment: bool = False) -> A.Compose:
    """Flips, rotation +-20 deg, colour jitter 0.3, with ``camera_augment`` :func:`camera_transforms`, ImageNet
    normalisation."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.Rotate(limit=20, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.0, p=0.8),
        *(camera_transforms() if camera_augment else []),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ToTensorV2(),
    ])


def evaluation_transform() -> A.Compose:
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()])


# ---------------------------------------------------------------------------------- inference
# One code path for a single photograph, shared by ``DRDataModule.inference_inputs`` (training's model report
# and bench) and a deployment bundle (``compression.deploy``), which rebuilds it from ``inference_spec()``.
GRADING_TASK = "grading"


def grading_spec(preprocessing: FundusPreprocessing, imager: PersistenceImager | None,
                 require_field_of_view: bool = True) -> dict[str, Any]:
    """Plain (JSON) values that rebuild the per-image grading inputs; ``imager`` = the fitted persistence
    imager of a run with topological features, else None; ``require_field_of_view``: the photograph check's
    (``datamodules.photograph.PhotographCheck``), so that prediction refuses what training refused."""
    return {
        "task": GRADING_TASK,
        "preprocess_version": PREPROCESS_VERSION,
        "image_size": preprocessing.image_size,
        "ben_graham": preprocessing.ben_graham,
        "imager": imager.state_dict() if imager is not None else None,
        "require_field_of_view": require_field_of_view,
    }


def grading_preprocessing_from_spec(
    spec: dict[str, Any],
) -> tuple[FundusPreprocessing, PersistenceImager | None]:
    """The preprocessing and (when the spec holds one) the fitted persistence imager of :func:`grading_spec`.

    Raises:
        ValueError: the spec is not a grading spec, or was written by another preprocessing version (its
            model saw differently prepared images).
    """
    check_preprocessing_spec(spec, GRADING_TASK, PREPROCESS_VERSION)
    preprocessing = FundusPreprocessing(image_size=int(spec["image_size"]),
                                        ben_graham=bool(spec["ben_graham"]))
    imager = PersistenceImager.from_state_dict(spec["imager"]) if spec.get("imager") else None
    return preprocessing, imager


def grading_network_inputs(
    image_rgb: np.ndarray, preprocessing: FundusPreprocessing, imager: PersistenceImager | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A decoded photograph as the evaluation loader serves it: (image (1, 3, S, S) normalised, topological
    features (1, F) from ``imager`` or (1, 0) without one, the preprocessed uint8 RGB image)."""
    image = preprocessing(image_rgb)
    tensor = evaluation_transform()(image=image)["image"].unsqueeze(0)
    if imager is None:
        return tensor, torch.zeros(1, 0), image
    features = imager.transform([image_diagrams(image, imager.config)])
    return tensor, torch.from_numpy(features), image


class FundusGradingDataset(Dataset):
    """Preprocessed (cached) images + precomputed topological features + grades (+ the teacher's cached soft
    targets, ``teacher_logits``, once ``callbacks.offline_distillation`` has set ``soft_targets``)."""

    def __init__(self, paths: list[str], labels: np.ndarray, topo_features: np.ndarray,
                 cache: PreprocessedImageCache, transform: A.Compose):
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.topo_features = topo_features
        self.cache = cache
        self.transform = transform
        #: (N, K) teacher logits in this dataset's order, or None (online distillation)
        self.soft_targets: np.ndarray | None = None
        #: the labelled set each image comes from (data=multi), or None for a single set
        self.sources: np.ndarray | None = None

    def evaluation_view(self, indices: list[int] | None = None) -> FundusGradingDataset:
        """These images (all, or ``indices``) without augmentation: what a teacher's soft targets are made from."""
        chosen = list(range(len(self))) if indices is None else list(indices)
        view = FundusGradingDataset([self.paths[i] for i in chosen], self.labels[chosen], self.topo_features[chosen],
                                    self.cache, evaluation_transform())
        view.sources = None if self.sources is None else self.sources[chosen]
        return view

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.cache.load(self.paths[index])
        return {
            "image": self.transform(image=image)["image"],
            # Topology is computed on the un-augmented image: cubical persistence is invariant to the
            # flips and 90-degree rotations used here and nearly so to small rotations.
            "topo": torch.from_numpy(self.topo_features[index]),
            "label": torch.tensor(self.labels[index]),
            "index": torch.tensor(index),
        } | ({} if self.soft_targets is None else {"teacher_logits": torch.from_numpy(self.soft_targets[index])})


class DRDataModule(LightningDataModule):
    """Reads, validates, splits (70/15/15, stratified, patient-grouped), caches and serves DR grading data.

    Everything that can fail on bad input happens in ``setup`` before the first training step:
    the label file is validated, every image is decoded once into the cache, and each split is
    checked for all five grades.
    """

    def __init__(
        self,
        format: str = "synthetic",
        root: str | None = None,
        image_size: int = 224,
        ben_graham: bool = False,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        weighted_sampling: bool = True,
        class_weight_beta: float = 0.999,
        augment: bool = True,
        camera_augment: bool = False,
        use_topology: bool = True,
        topo_resolution: int = 64,
        topo_min_persistence: float = 0.02,
        topo_image_resolution: int = 32,
        topo_bandwidth_fraction: float = 0.05,
        cache_dir: str = ".cache",
        skip_unusable: bool = False,
        require_field_of_view: bool = True,
        synthetic_num_images: int = 600,
        synthetic_raw_size: int = 384,
        synthetic_class_proportions: tuple[float, ...] = (0.4, 0.15, 0.2, 0.1, 0.15),
        synthetic_seed: int = 0,
        sources: dict[str, dict[str, str]] | None = None,
    ):
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"data.format={format!r}: choose one of {FORMATS}")
        self.sources = self._checked_sources(format, sources)
        if format not in ("synthetic", "multi") and not root:
            raise DataValidationError(f"data={format} needs data.root=<dataset folder>",
                                      fix=f"run e.g. make dr-distill ARGS='data={format} data.root=/path/to/{format}'")
        self.format = format
        self.root = root
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.weighted_sampling = weighted_sampling
        self.class_weight_beta = class_weight_beta
        self.augment = augment
        self.camera_augment = camera_augment
        self.use_topology = use_topology
        self.cache_dir = Path(cache_dir)
        self.synthetic = dict(num_images=synthetic_num_images, raw_size=synthetic_raw_size,
                              class_proportions=list(synthetic_class_proportions), seed=synthetic_seed)
        self.preprocessing = FundusPreprocessing(image_size=image_size, ben_graham=ben_graham)
        self.topology = TopologyConfig(resolution=topo_resolution, min_persistence=topo_min_persistence,
                                       image_resolution=topo_image_resolution,
                                       bandwidth_fraction=topo_bandwidth_fraction)
        self.skip_unusable = skip_unusable
        self.photograph_check = PhotographCheck.for_image_size(image_size, require_field_of_view)
        self.image_cache = PreprocessedImageCache(self.cache_dir, self.preprocessing, self.photograph_check)
        self.index: pd.DataFrame | None = None
        #: sample_id, path, reason of the files data.skip_unusable=true left out (empty: none)
        self.skipped = pd.DataFrame(columns=SKIPPED_COLUMNS)
        self.split_indices: dict[str, np.ndarray] = {}
        self.imager: PersistenceImager | None = None
        self.datasets: dict[str, FundusGradingDataset] = {}
        #: with_image_size's modules, by size: the teacher stage and the student's soft targets share one
        self._at_image_size: dict[int, DRDataModule] = {}

    @staticmethod
    def _checked_sources(format: str, sources: dict[str, dict[str, str]] | None) -> dict[str, dict[str, str]]:
        """data=multi's labelled sets, ``{name: {format: aptos|eyepacs, root: folder}}``; empty otherwise."""
        if format != "multi":
            return {}
        fix = ("give two or more, e.g. data=multi data.sources.aptos.root=/data/aptos "
               "data.sources.eyepacs.root=/data/eyepacs")
        if not sources or len(sources) < 2:
            raise DataValidationError(f"data=multi needs at least two labelled sets in data.sources, got "
                                      f"{sorted(sources or {})}", fix=fix)
        problems = []
        for name, source in sources.items():
            if not isinstance(source, dict) or source.get("format") not in SOURCE_FORMATS:
                problems.append(f"data.sources.{name}.format must be one of {list(SOURCE_FORMATS)}")
            elif not source.get("root") or str(source.get("root")) == "???":
                problems.append(f"data.sources.{name}.root is not set")
            elif "/" in name:
                problems.append(f"data.sources.{name}: a set's name may not contain '/'")
        if problems:
            raise DataValidationError("; ".join(problems), fix=fix)
        return {name: {"format": str(s["format"]), "root": str(s["root"])} for name, s in sources.items()}

    # ----------------------------------------------------------------------------------- facts
    @property
    def num_classes(self) -> int:
        return NUM_GRADES

    @property
    def topology_dim(self) -> int:
        return self.topology.feature_dim if self.use_topology else 0

    @property
    def is_synthetic(self) -> bool:
        return self.format == "synthetic"

    @property
    def dataset_root(self) -> Path:
        if self.format == "multi":
            raise ValueError("data=multi has no single dataset root: its sets are data.sources.<name>.root")
        if self.is_synthetic:
            s = self.synthetic
            name = f"n{s['num_images']}-s{s['raw_size']}-seed{s['seed']}"
            return self.cache_dir / "synthetic_dr" / name
        return Path(self.root).expanduser()

    @property
    def class_weights(self) -> list[float]:
        """Effective-number weights of the grade counts the loss actually sees.

        With the weighted sampler on, every grade is drawn equally often (N/K each), so the weights
        come out uniform: weighting the loss as well would correct the imbalance twice. On the
        EyePACS dev set that double correction gave a teacher predicting mostly grades 3-4 (test
        accuracy 0.27 against 0.47 for always answering grade 0). With the sampler off the weights
        follow the training split's real counts.
        """
        counts = class_counts(self._labels("train"), NUM_GRADES)
        if self.weighted_sampling:
            counts = np.where(counts > 0, counts.sum() / np.count_nonzero(counts), 0)
        return effective_number_weights(counts, self.class_weight_beta).tolist()

    @property
    def fingerprint(self) -> str:
        """Short hash of (id, grade, file size) of every image: changes when the data does."""
        self._require_setup()
        rows = self.index.sort_values("sample_id").itertuples()
        return data_fingerprint(f"{row.sample_id}|{row.label}|{Path(row.path).stat().st_size}" for row in rows)

    def split_table(self) -> pd.DataFrame:
        """sample_id, patient, label, split, path (and dataset, with data=multi): saved and logged with every run."""
        self._require_setup()
        table = with_split_column(self.index, self.split_indices)
        return table[["sample_id", "patient", "label", "split", "path", *(["dataset"] if "dataset" in table else [])]]

    def majority_baseline_accuracy(self, split: str = "test") -> float:
        """Accuracy of always predicting the training split's most frequent grade."""
        majority = int(np.argmax(class_counts(self._labels("train"), NUM_GRADES)))
        return float(np.mean(self._labels(split) == majority))

    def _labels(self, split: str) -> np.ndarray:
        self._require_setup()
        return self.index["label"].to_numpy()[self.split_indices[split]]

    def _require_setup(self) -> None:
        if self.index is None:
            raise RuntimeError("DRDataModule.setup() has not run yet")

    # ----------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        # Lightning calls prepare_data again for every fit and test: once the data is set up, the
        # synthetic set exists and the banner has been shown.
        if self.is_synthetic and self.index is None:
            log.warning(SYNTHETIC_BANNER)
            write_synthetic_dr_dataset(self.dataset_root, **self.synthetic)

    def read_index(self, missing_images: list[str] | None = None) -> pd.DataFrame:
        """The label file's validated index; with a ``missing_images`` list, rows without their image are
        described there instead of failing (``datamodules.dr_index``)."""
        if self.format == "multi":
            return self._multi_index(missing_images)
        if self.format == "eyepacs":
            return read_eyepacs_index(self.dataset_root, missing_images)
        # APTOS layout, also what the synthetic writer produces
        return read_aptos_index(self.dataset_root, missing_images)

    def _multi_index(self, missing_images: list[str] | None) -> pd.DataFrame:
        """Every source's index, ids and patients prefixed with the source's name (``aptos/000c1434d8d7``) so that
        two sets' ids never collide, with a ``dataset`` column."""
        tables = []
        for name, source in self.sources.items():
            reader = read_eyepacs_index if source["format"] == "eyepacs" else read_aptos_index
            table = reader(Path(source["root"]).expanduser(), missing_images)
            table = table.assign(sample_id=f"{name}/" + table["sample_id"].astype(str),
                                 patient=f"{name}/" + table["patient"].astype(str), dataset=name)
            tables.append(table)
        return pd.concat(tables, ignore_index=True)

    @property
    def image_folders(self) -> tuple[str, ...]:
        """Where this format's images are looked for, under ``dataset_root`` (not for data=multi: each source has
        its own)."""
        if self.format == "multi":
            raise ValueError("data=multi has one image folder per source: evaluate one labelled set at a time "
                             "(data=aptos|eyepacs data.root=<folder>)")
        return IMAGE_FOLDERS["eyepacs" if self.format == "eyepacs" else "aptos"]

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        if self.is_synthetic and not (self.dataset_root / "train.csv").is_file():
            self.prepare_data()
        index = self._usable(self.read_index())
        labels = index["label"].to_numpy()
        splits = self._split(index)
        check_splits(labels, splits, NUM_GRADES)
        paths = [Path(p) for p in index["path"]]
        self.index, self.split_indices = index, splits
        self._build_datasets(self._topological_features(paths, splits["train"]))
        counts = {name: class_counts(labels[idx], NUM_GRADES).tolist() for name, idx in splits.items()}
        log.info("DR data (%s, %d images): images per grade %s; class weights %s", self.format, len(index),
                 counts, np.round(self.class_weights, 3).tolist())

    def _build_datasets(self, topo: np.ndarray) -> None:
        """One dataset per split of the set-up index, reading this module's image cache."""
        paths, labels = self.index["path"].tolist(), self.index["label"].to_numpy()
        eval_tf = evaluation_transform()
        train_tf = training_transform(self.preprocessing.image_size, self.camera_augment) if self.augment else eval_tf
        for name in SPLITS:
            idx = self.split_indices[name]
            self.datasets[name] = FundusGradingDataset(
                [str(paths[i]) for i in idx], labels[idx], topo[idx], self.image_cache,
                train_tf if name == "train" else eval_tf,
            )
            if "dataset" in self.index:
                self.datasets[name].sources = self.index["dataset"].to_numpy()[idx]

    def with_image_size(self, image_size: int) -> DRDataModule:
        """The same images, splits, labels and sampler prepared at ``image_size``, without topological features:
        what a teacher that sees more than its student trains and grades on (``distill.teacher_image_size``).
        Each image is decoded once more into the cache at that size; one that is usable at this module's size
        but not at the other stops the run, listed, as in ``setup``."""
        self._require_setup()
        if image_size == self.preprocessing.image_size:
            return self
        if image_size in self._at_image_size:
            return self._at_image_size[image_size]
        other = copy.copy(self)
        other._at_image_size = {}
        other.preprocessing = FundusPreprocessing(image_size=image_size, ben_graham=self.preprocessing.ben_graham)
        other.photograph_check = PhotographCheck.for_image_size(image_size, self.photograph_check.require_field_of_view)
        other.image_cache = PreprocessedImageCache(self.cache_dir, other.preprocessing, other.photograph_check)
        other.use_topology, other.imager, other.datasets = False, None, {}
        log.info("The same %d images at %d px (decoded once into the cache, then read from it)", len(self.index),
                 image_size)
        problems = other.image_cache.warm([Path(p) for p in self.index["path"]], num_threads=max(2, self.num_workers))
        if problems:
            raise DataValidationError(f"{len(problems)} image(s) usable at {self.preprocessing.image_size} px are "
                                      f"not at {image_size} px",
                                      [f"{self.index['path'].iloc[i]}: {reason}" for i, reason in problems],
                                      fix="remove them from the label CSV, or choose sizes at which both accept them")
        other._build_datasets(np.zeros((len(self.index), 0), np.float32))
        self._at_image_size[image_size] = other
        return other

    def _split(self, index: pd.DataFrame) -> dict[str, np.ndarray]:
        """70/15/15 (by default), stratified and patient-grouped; with data=multi each set is split on its own, so
        each keeps its proportions and has a test split of its own (per-set test metrics)."""
        labels, groups = index["label"].to_numpy(), index["patient"].to_numpy()
        if "dataset" not in index:
            return stratified_group_split(labels, groups, self.val_fraction, self.test_fraction, self.seed)
        parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
        for name in self.sources:
            rows = np.flatnonzero(index["dataset"].to_numpy() == name)
            own = stratified_group_split(labels[rows], groups[rows], self.val_fraction, self.test_fraction, self.seed)
            check_splits(labels[rows], own, NUM_GRADES)
            for split, positions in own.items():
                parts[split].append(rows[positions])
        return {split: np.concatenate(chunks) for split, chunks in parts.items()}

    def _usable(self, index: pd.DataFrame) -> pd.DataFrame:
        """Decode, check and cache every image before anything trains: the index of the usable ones. An unusable
        file stops the run, listed with its reason, unless ``skip_unusable`` (then it is left out and listed
        in ``self.skipped``)."""
        paths = index["path"].tolist()
        log.info("Decoding, checking and caching %d images (first run only) under %s", len(paths),
                 self.image_cache.root)
        problems = self.image_cache.warm([Path(p) for p in paths], num_threads=max(2, self.num_workers))
        index, self.skipped = drop_unusable(index, paths, problems, self.skip_unusable, "images",
                                            "replace or delete these files and remove their rows from the label CSV.")
        return index

    def _diagrams(self, path: Path) -> list[np.ndarray]:
        """Persistence diagrams of one image, cached on disk next to its preprocessed image."""
        key = source_key(path, self.preprocessing.key, self.topology.key)
        entry = self.cache_dir / "topology" / self.topology.key / key[:2] / f"{key}.npy"
        cached = load_npy_checked(entry, (None, 3), np.dtype(np.float32))
        if cached is None:
            cached = pack_diagrams(image_diagrams(self.image_cache.load(path), self.topology))
            atomic_save_npy(entry, cached)
        return unpack_diagrams(cached)

    def _topological_features(self, paths: list[Path], train_indices: np.ndarray) -> np.ndarray:
        if not self.use_topology:
            return np.zeros((len(paths), 0), np.float32)
        diagrams = [self._diagrams(p) for p in paths]
        self.imager = PersistenceImager(self.topology).fit([diagrams[i] for i in train_indices])
        return self.imager.transform(diagrams)

    # ------------------------------------------------------------------------------ inference
    def inference_spec(self) -> dict[str, Any]:
        """What a deployment bundle needs to prepare a photograph as this module does (``grading_spec``)."""
        self._require_setup()  # the persistence imager is fitted in setup
        return grading_spec(self.preprocessing, self.imager if self.use_topology else None,
                            self.photograph_check.require_field_of_view)

    def inference_inputs(self, path: str | Path, with_topology: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The clinic's per-image path, uncached: decode, preprocess, topology, normalise -> batch of 1."""
        imager = self.imager if self.use_topology and with_topology else None
        image, topo, _ = grading_network_inputs(read_photograph(path, self.photograph_check), self.preprocessing,
                                                imager)
        return image, topo

    # ---------------------------------------------------------------------------- dataloaders
    def _loader(self, split: str, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, shuffle=shuffle and sampler is None,
            sampler=sampler, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.weighted_sampling:
            weights = inverse_frequency_sample_weights(self._labels("train"), NUM_GRADES)
            generator = torch.Generator().manual_seed(self.seed)
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(weights),
                                            replacement=True, generator=generator)
        return self._loader("train", shuffle=True, sampler=sampler)

    def calibration_dataloader(self) -> DataLoader:
        """Training images without augmentation, in a seeded random order: what int8 activation ranges are
        calibrated on (the inference distribution, not the augmented one)."""
        return DataLoader(self.datasets["train"].evaluation_view(), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
