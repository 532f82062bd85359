"""The victim networks and the LightningModule that trains them."""

from lightning_modules.networks import NETWORKS, VictimNetwork, build_network, check_network_fits

__all__ = ["NETWORKS", "VictimNetwork", "build_network", "check_network_fits"]
