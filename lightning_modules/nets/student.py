"""The distilled DR student: CNN features refined by CBAM, fused with a topological branch."""

from __future__ import annotations

import torch
from timm.layers.cbam import CbamModule
from torch import Tensor, nn

from lightning_modules.nets.backbones import create_backbone
from lightning_modules.nets.grading_head import (
    CLASSIFICATION,
    GradeDecoder,
    decode,
    output_layer,
    uses_thresholds,
)


class TopologyMLP(nn.Module):
    """Persistence-image vector -> compact embedding."""

    def __init__(self, in_features: int, hidden: int = 256, out_features: int = 64, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, out_features), nn.ReLU(inplace=True),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class TopoFusionNet(nn.Module):
    """Backbone feature map -> CBAM -> global average pool, concatenated with the topology embedding.

    ``topo_features=0`` gives the CNN + CBAM student without a topological branch (the ablation
    and the cheaper deployment option); ``forward`` then ignores its second argument. ``use_cbam=False`` pools
    the backbone's feature map directly (the CBAM ablation). ``head`` is one of
    ``lightning_modules.nets.grading_head.HEADS``: ``raw_outputs`` is what the losses see, ``forward`` always
    returns (B, K) class logits (decoded at the fitted thresholds for the regression and ordinal heads).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 5,
        topo_features: int = 2048,
        topo_hidden: int = 256,
        topo_embedding: int = 64,
        cbam_rd_ratio: float = 1 / 16,
        head_dropout: float = 0.5,
        head: str = CLASSIFICATION,
        use_cbam: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        channels = backbone.num_features
        self.cbam = CbamModule(channels, rd_ratio=cbam_rd_ratio) if use_cbam else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.topology = TopologyMLP(topo_features, topo_hidden, topo_embedding) if topo_features > 0 else None
        fused = channels + (topo_embedding if self.topology is not None else 0)
        self.head_kind = head
        # the Sequential keeps a classifier's state-dict keys (head.1.*) those of earlier runs
        self.head = nn.Sequential(nn.Dropout(head_dropout), output_layer(fused, num_classes, head))
        self.decoder = GradeDecoder(num_classes) if uses_thresholds(head) else None

    @property
    def uses_topology(self) -> bool:
        return self.topology is not None

    def attended_features(self, image: Tensor) -> Tensor:
        """The CBAM-refined last feature map (B, C, h, w): the GradCAM target layer's output."""
        return self.cbam(self.backbone.forward_features(image))

    def raw_outputs(self, image: Tensor, topo: Tensor | None = None) -> Tensor:
        """The head's own outputs: K logits, one grade, or K-1 ordinal logits."""
        pooled = self.pool(self.attended_features(image)).flatten(1)
        if self.topology is not None:
            if topo is None:
                raise ValueError("this student fuses topological features: pass forward(image, topo)")
            pooled = torch.cat([pooled, self.topology(topo)], dim=1)
        return self.head(pooled)

    def forward(self, image: Tensor, topo: Tensor | None = None) -> Tensor:
        return decode(self.raw_outputs(image, topo), self.head_kind, self.decoder)


def build_student_net(
    backbone: str = "tf_efficientnet_lite0",
    pretrained: str = "none",
    pretrained_path: str | None = None,
    num_classes: int = 5,
    topo_features: int = 2048,
    topo_hidden: int = 256,
    topo_embedding: int = 64,
    cbam_rd_ratio: float = 1 / 16,
    head_dropout: float = 0.5,
    drop_rate: float = 0.0,
    head: str = CLASSIFICATION,
    use_cbam: bool = True,
) -> TopoFusionNet:
    """A timm backbone without its pooling/classifier, wrapped into the fusion network."""
    features = create_backbone(backbone, pretrained=pretrained, pretrained_path=pretrained_path,
                               num_classes=0, global_pool="", drop_rate=drop_rate)
    return TopoFusionNet(features, num_classes, topo_features, topo_hidden, topo_embedding, cbam_rd_ratio,
                         head_dropout, head, use_cbam)
