"""mmmoe: multimodal Multi-Head Mixture-of-Experts. The model library (pure PyTorch)."""

__version__ = "0.1.0"
