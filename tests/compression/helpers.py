"""Networks the compression tests share."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from lightning_modules.nets.vgg_unet import VGGUNet


def tiny_unet(base: int = 4) -> VGGUNet:
    """A VGGUNet in eval mode whose logits vary with the input, with non-trivial BatchNorm statistics (export
    folds them into the convs).

    He initialisation keeps the signal alive through the 19 conv layers; with PyTorch's default init (and the
    prior-initialised head bias) a random network's logits are nearly constant (std 0.004 around -3.9).
    """
    torch.manual_seed(0)
    net = VGGUNet(base=base)
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    nn.init.zeros_(net.head.bias)
    return net.eval()


class DiscBatches(Dataset):
    """Image/mask pairs served as the optic-disc datamodule's dict samples (``image``, ``mask``, ``index``)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor):
        self.images = images
        self.masks = masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "mask": self.masks[index], "index": torch.tensor(index)}
