"""The distilled DR student: CNN features refined by CBAM, fused with a topological branch."""

from __future__ import annotations

import torch
from timm.layers.cbam import CbamModule
from torch import Tensor, nn

from lightning_modules.nets.backbones import create_backbone


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
    and the cheaper deployment option); ``forward`` then ignores its second argument.
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
    ):
        super().__init__()
        self.backbone = backbone
        channels = backbone.num_features
        self.cbam = CbamModule(channels, rd_ratio=cbam_rd_ratio)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.topology = TopologyMLP(topo_features, topo_hidden, topo_embedding) if topo_features > 0 else None
        fused = channels + (topo_embedding if self.topology is not None else 0)
        self.head = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(fused, num_classes))

    @property
    def uses_topology(self) -> bool:
        return self.topology is not None

    def attended_features(self, image: Tensor) -> Tensor:
        """The CBAM-refined last feature map (B, C, h, w): the GradCAM target layer's output."""
        return self.cbam(self.backbone.forward_features(image))

    def forward(self, image: Tensor, topo: Tensor | None = None) -> Tensor:
        pooled = self.pool(self.attended_features(image)).flatten(1)
        if self.topology is not None:
            if topo is None:
                raise ValueError("this student fuses topological features: pass forward(image, topo)")
            pooled = torch.cat([pooled, self.topology(topo)], dim=1)
        return self.head(pooled)


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
) -> TopoFusionNet:
    """A timm backbone without its pooling/classifier, wrapped into the fusion network."""
    features = create_backbone(backbone, pretrained=pretrained, pretrained_path=pretrained_path,
                               num_classes=0, global_pool="", drop_rate=drop_rate)
    return TopoFusionNet(features, num_classes, topo_features, topo_hidden, topo_embedding, cbam_rd_ratio,
                         head_dropout)
