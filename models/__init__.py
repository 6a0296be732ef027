"""ResNet/ResNeXt architectures and the registry of the twelve published weight sets."""
from .factory import create_model, entry
from .registry import ARCHS, WEIGHTS
from .resnet import ResNet, ResNetFeatures

__all__ = ["ARCHS", "WEIGHTS", "ResNet", "ResNetFeatures", "create_model", "entry"]
