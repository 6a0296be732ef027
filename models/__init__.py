"""ResNet/ResNeXt architectures and the registry of the twelve published weight sets."""
from models.factory import create_model, entry
from models.registry import ARCHS, WEIGHTS
from models.resnet import ResNet, ResNetFeatures

__all__ = ["ARCHS", "WEIGHTS", "ResNet", "ResNetFeatures", "create_model", "entry"]
