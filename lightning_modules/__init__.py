"""The victim networks and the LightningModule that trains them.

The exports load on first use (PEP 562): ``attack.py``'s option parser reads
``lightning_modules.train_config`` (through ``experiment.train_cli``) before torch,
torchvision or Lightning is imported.
"""

__all__ = ["NETWORKS", "VictimClassifier", "VictimNetwork", "build_network", "check_network_fits"]


def __getattr__(name: str):
    if name == "VictimClassifier":
        # attack.py needs the networks but not Lightning's training stack
        from lightning_modules.classifier import VictimClassifier

        return VictimClassifier
    if name in ("NETWORKS", "VictimNetwork", "build_network", "check_network_fits"):
        from lightning_modules import networks

        return getattr(networks, name)
    raise AttributeError(f"module 'lightning_modules' has no attribute {name!r}")
