import pytest
import torch
from timm.layers.cbam import CbamModule

from lightning_modules.nets.student import TopoFusionNet, build_student_net


@pytest.fixture(scope="module")
def student() -> TopoFusionNet:
    torch.manual_seed(0)
    return build_student_net("tf_efficientnet_lite0", pretrained="none", topo_features=2 * 16 * 16).eval()


def test_cbam_keeps_the_feature_map_shape(student: TopoFusionNet):
    assert isinstance(student.cbam, CbamModule)
    image = torch.randn(2, 3, 96, 96)
    raw = student.backbone.forward_features(image)
    attended = student.attended_features(image)
    assert attended.shape == raw.shape == (2, 1280, 3, 3)
    assert not torch.allclose(attended, raw)  # the gates do something


def test_fusion_output_shape_and_topology_changes_the_prediction(student: TopoFusionNet):
    image = torch.randn(3, 3, 96, 96)
    topo = torch.rand(3, 512)
    with torch.no_grad():
        logits = student(image, topo)
        other = student(image, topo * 5)
    assert logits.shape == (3, 5)
    assert not torch.allclose(logits, other)


def test_fusion_without_topology_and_missing_topology_error():
    net = build_student_net("tf_efficientnet_lite0", pretrained="none", topo_features=0).eval()
    assert not net.uses_topology
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    fused = build_student_net("tf_efficientnet_lite0", pretrained="none", topo_features=8)
    with pytest.raises(ValueError, match="topo"):
        fused(torch.randn(1, 3, 64, 64))


def test_gradients_reach_the_backbone_cbam_and_topology_branch(student: TopoFusionNet):
    student.train()
    loss = student(torch.randn(2, 3, 64, 64), torch.rand(2, 512)).sum()
    loss.backward()
    for module in (student.backbone.conv_stem, student.cbam.spatial.conv.conv, student.topology.layers[0]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    student.zero_grad()
