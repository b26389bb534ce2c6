"""Base networks registered by name: our CIFAR-style ResNets, torchvision and timm models."""

from dynnet.models.cifar_resnet import BasicBlock, CifarResNet, cifar_resnet
from dynnet.models.registry import MODELS, build_base_model, check_model_name

__all__ = ["MODELS", "BasicBlock", "CifarResNet", "build_base_model", "check_model_name", "cifar_resnet"]
