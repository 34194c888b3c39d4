"""Network definitions: the V-Net backbone and the dual-task pair."""

from dtml_deploy.nets.dual import DualTaskNet, sdm_to_mask
from dtml_deploy.nets.vnet import VNet

__all__ = ["DualTaskNet", "VNet", "sdm_to_mask"]
