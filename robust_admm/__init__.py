"""robust-admm: adversarial training run concurrently with ADMM compression."""

__version__ = "0.1.0"
