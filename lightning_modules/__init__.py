"""The victim networks and the LightningModule that trains them."""

from lightning_modules.networks import NETWORKS, VictimNetwork, build_network, check_network_fits

__all__ = ["NETWORKS", "VictimClassifier", "VictimNetwork", "build_network", "check_network_fits"]


def __getattr__(name: str):
    # Imported on first use: attack.py needs the networks but not Lightning's training stack.
    if name == "VictimClassifier":
        from lightning_modules.classifier import VictimClassifier

        return VictimClassifier
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
