"""Reference models trained on the phantoms (needs the ``train`` extra: PyTorch CPU).

``edge-runtime models train NAME`` reproduces a shipped bundle under edge_runtime/models/NAME;
``edge-runtime models card NAME`` regenerates docs/models/NAME.md and its PNGs;
``edge-runtime models list`` shows the shipped bundles and their held-out metrics.
"""
