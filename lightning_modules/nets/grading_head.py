"""Grading heads: a classifier, a regressor of the grade, or an ordinal (CORAL) head, all deployed as class logits.

DR grades are ordered, and the APTOS/EyePACS metric (quadratic weighted kappa) charges a 0-for-4 error sixteen
times a 0-for-1 error. A classification head ignores the order; a regression head (MSE on the grade) and an
ordinal head (K-1 cumulative "grade > k" outputs) use it. Both of the latter give a continuous grade, cut at
four thresholds fitted on the validation split to maximise QWK (``lightning_modules.ordinal``).

Whatever the head, the network's ``forward`` returns (B, K) class logits, so every consumer (metrics, ONNX
export, int8 parity, ``make predict``/``evaluate``, GradCAM) works unchanged: the continuous grade ``s`` is
turned into adjacent-category logits ``L_k = sum_{j<=k} (s - t_j) / scale`` (:class:`GradeDecoder`). Their
argmax is exactly the thresholded grade (the differences ``L_k - L_{k-1} = (s - t_k) / scale`` fall with k, so
the largest ``L_k`` is at the number of thresholds below ``s``), and their softmax is the adjacent-category
ordinal model, whose one parameter ``scale`` is fitted on the validation split for calibrated probabilities.
Thresholds and scale are buffers: they travel in the checkpoint, the safetensors network and the ONNX graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

CLASSIFICATION = "classification"
REGRESSION = "regression"
ORDINAL = "ordinal"
HEADS = (CLASSIFICATION, REGRESSION, ORDINAL)


def check_head(head: str) -> str:
    if head not in HEADS:
        raise ValueError(f"head={head!r}: choose one of {list(HEADS)}")
    return head


def uses_thresholds(head: str) -> bool:
    """Regression and ordinal heads predict a continuous grade cut at fitted thresholds; a classifier does not."""
    return check_head(head) != CLASSIFICATION


class CoralLayer(nn.Module):
    """CORAL's output layer (Cao, Mirjalili & Raschka 2020): one shared weight vector and K-1 biases.

    Logit k is ``w.x + b_k`` for "grade > k". Sharing ``w`` makes the K-1 binary tasks rank-consistent (the
    cumulative probabilities never cross), so the expected grade is a monotone function of one latent score.
    Chosen over CORN (separate conditional tasks, no shared score) because the thresholds fitted afterwards
    need exactly such a monotone score, and over a cumulative-link head because the two are the same model
    here up to the link function. Written by hand: it is one linear layer, and ``coral-pytorch`` would add a
    dependency for it.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.score = nn.Linear(in_features, 1, bias=False)
        # the K-1 biases as a Linear(1, K-1) whose weight is frozen at 1: every parameter then sits in a layer type
        # the int8 and QAT paths (compression.quantization) know, and a weight of 1 is exact in int8
        self.offsets = nn.Linear(1, num_classes - 1)
        self.offsets.weight.data.fill_(1.0)
        self.offsets.weight.requires_grad_(False)
        # ordered initial biases: a fresh head predicts the middle grades, not all-or-nothing
        self.offsets.bias.data.copy_(torch.linspace(1.0, -1.0, num_classes - 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.offsets(self.score(features))


def output_layer(in_features: int, num_classes: int, head: str) -> nn.Module:
    """The last layer of a head: K logits (classification), one grade (regression), K-1 CORAL logits (ordinal)."""
    check_head(head)
    if head == CLASSIFICATION:
        return nn.Linear(in_features, num_classes)
    if head == REGRESSION:
        return nn.Linear(in_features, 1)
    return CoralLayer(in_features, num_classes)


def continuous_grade(raw: Tensor, head: str) -> Tensor:
    """(B,) continuous grade in [0, K-1]-ish from a head's raw outputs.

    Regression: the output itself. Ordinal: the expected grade ``sum_k P(grade > k)``. Classification: the
    expected grade under the softmax (used for distillation targets and diagnostics, never for its decisions).
    """
    check_head(head)
    if head == REGRESSION:
        return raw[:, 0]
    if head == ORDINAL:
        return raw.sigmoid().sum(dim=1)
    grades = torch.arange(raw.shape[1], dtype=raw.dtype, device=raw.device)
    return raw.softmax(dim=1) @ grades


def default_thresholds(num_classes: int) -> Tensor:
    """Rounding to the nearest grade: 0.5, 1.5, ..., K-1.5."""
    return torch.arange(num_classes - 1, dtype=torch.float32) + 0.5


class GradeDecoder(nn.Module):
    """Continuous grade (B,) -> (B, K) adjacent-category logits whose argmax is the thresholded grade.

    ``thresholds`` (K-1, increasing) and ``scale`` (> 0) are persistent buffers, set by
    :meth:`set_fit` from the validation split and saved wherever the network's state goes.
    """

    thresholds: Tensor
    scale: Tensor

    def __init__(self, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"GradeDecoder needs at least 2 grades, got {num_classes}")
        self.register_buffer("thresholds", default_thresholds(num_classes))
        self.register_buffer("scale", torch.tensor(1.0))

    @property
    def num_classes(self) -> int:
        return self.thresholds.numel() + 1

    def set_fit(self, thresholds, scale: float) -> None:
        thresholds = torch.as_tensor(thresholds, dtype=self.thresholds.dtype, device=self.thresholds.device)
        if thresholds.shape != self.thresholds.shape or not bool((thresholds.diff() > 0).all()):
            raise ValueError(f"thresholds must be {self.thresholds.numel()} increasing values, got {thresholds.tolist()}")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.thresholds.copy_(thresholds)
        self.scale.fill_(float(scale))

    def forward(self, grade: Tensor) -> Tensor:
        steps = torch.arange(self.num_classes, dtype=grade.dtype, device=grade.device)
        offsets = torch.cat([self.thresholds.new_zeros(1), self.thresholds.cumsum(0)]).to(grade.dtype)
        return (grade[:, None] * steps - offsets) / self.scale.to(grade.dtype)


def decode(raw: Tensor, head: str, decoder: GradeDecoder | None) -> Tensor:
    """Class logits from a head's raw outputs: themselves for a classifier, else the decoded continuous grade."""
    if decoder is None:
        if uses_thresholds(head):
            raise ValueError(f"a {head} head needs its GradeDecoder")
        return raw
    return decoder(continuous_grade(raw, head))
