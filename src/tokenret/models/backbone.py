"""ResNet trunk with the release's module names (``block1`` .. ``block5``).

The Token release keeps the torchvision ResNet children except avgpool/fc and renames them:
``block1`` = (conv1, bn1, relu, maxpool), ``block2..block5`` = layer1..layer4. State-dict keys are
therefore ``backbone.block{1..5}...``; torchvision weights are renamed on load.
"""

from __future__ import annotations

import logging

import torchvision
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: torchvision architecture name -> (output channels of block4, output channels of block5)
RESNET_CHANNELS = {
    "resnet18": (256, 512),
    "resnet34": (256, 512),
    "resnet50": (1024, 2048),
    "resnet101": (1024, 2048),
    "resnet152": (1024, 2048),
}

#: The ImageNet weights the release used (torchvision's ``pretrained=True`` == IMAGENET1K_V1, not DEFAULT/V2).
IMAGENET_WEIGHTS = "IMAGENET1K_V1"


def _rename_torchvision_key(key: str) -> str | None:
    """Map a torchvision ResNet key to the trunk's naming, or None for the classifier (fc)."""
    if key.startswith("fc."):
        return None
    for i, layer in enumerate(("layer1", "layer2", "layer3", "layer4"), start=2):
        if key.startswith(layer + "."):
            return f"block{i}." + key[len(layer) + 1 :]
    if key.startswith("conv1."):
        return "block1.0." + key[len("conv1.") :]
    if key.startswith("bn1."):
        return "block1.1." + key[len("bn1.") :]
    raise KeyError(f"unexpected torchvision ResNet key {key!r}")


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without avgpool/fc, as ``block1`` .. ``block5``.

    Args:
        arch: torchvision ResNet name (resnet18/34/50/101/152).
        imagenet_weights: None for random initialisation, or a torchvision weights enum name such as
            "IMAGENET1K_V1" (downloaded once through torchvision's weights API into the torch hub cache).
        dilation_block5: output stride 16 instead of 32 (stride 1 in block5, dilation 2 in its 3x3 convs).
        trainable: False freezes every parameter (the release's NetVLAD baseline).
        return_block4: forward returns (block4 output, block5 output) instead of block5 only.
    """

    def __init__(
        self,
        arch: str = "resnet101",
        imagenet_weights: str | None = None,
        dilation_block5: bool = False,
        trainable: bool = True,
        return_block4: bool = False,
    ) -> None:
        super().__init__()
        if arch not in RESNET_CHANNELS:
            raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(RESNET_CHANNELS)}")
        self.arch = arch
        self.out_channels_block4, self.out_channels = RESNET_CHANNELS[arch]
        self.return_block4 = return_block4
        net = getattr(torchvision.models, arch)(weights=None)
        self.block1 = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.block2 = net.layer1
        self.block3 = net.layer2
        self.block4 = net.layer3
        self.block5 = net.layer4
        if dilation_block5:
            _dilate_last_stage(self.block5)
        if imagenet_weights:
            self.load_imagenet_weights(imagenet_weights)
        if not trainable:
            for p in self.parameters():
                p.requires_grad_(False)

    def load_imagenet_weights(self, weights_name: str = IMAGENET_WEIGHTS) -> None:
        """Load torchvision ImageNet weights (downloaded once into the torch hub cache)."""
        from tokenret.models.checkpoints import fetch_torchvision_weights

        state = fetch_torchvision_weights(self.arch, weights_name)
        renamed = {}
        for k, v in state.items():
            new = _rename_torchvision_key(k)
            if new is not None:
                renamed[new] = v
        self.load_state_dict(renamed, strict=True)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        x = self.block1(x)
        x = self.block2(x)
        x = self.block3(x)
        x4 = self.block4(x)
        x5 = self.block5(x4)
        if self.return_block4:
            return x4, x5
        return x5


def _dilate_last_stage(stage: nn.Sequential, dilation: int = 2) -> None:
    """Stride 1 in the stage's first block, dilation/padding ``dilation`` in the other blocks' 3x3 convs."""
    first = stage[0]
    for m in first.modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)
    for block in list(stage)[1:]:
        conv = block.conv2
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation, dilation)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ResNetTrunk", "RESNET_CHANNELS", "IMAGENET_WEIGHTS", "count_parameters"]
