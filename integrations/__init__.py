"""Label-leakage audits of one's own models and of federations run in other frameworks.

``integrations.audit`` is the Python API (any ``nn.Module``, no extra dependency);
``integrations.flower`` wraps a Flower strategy and needs ``pip install -e '.[flower]'``.
"""
