"""llmctl: the control plane for training and serving foundation models on GPU clusters."""

__version__ = "0.1.0"
