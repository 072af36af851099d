"""The device configs (*.yaml). A package only so that a non-editable install (pip install .) carries
them: edge_runtime.devices looks for this folder next to the edge_runtime package."""
