"""robust-admm: adversarially robust and compressed networks with JAX, Flax and ADMM."""
import re

from setuptools import find_packages, setup

# The version is defined once, in robust_admm/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"', open("robust_admm/__init__.py",
                                                       encoding="utf-8").read(), re.M).group(1)

setup(
    name="robust-admm",
    version=VERSION,
    description=(
        "Concurrent adversarial training and ADMM compression (pruning, quantization) "
        "in JAX/Flax"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The dataset and study configs (configs/) ship inside the package as
    # robust_admm/configs, where `--config configs/...` finds them from any directory
    # (robust_admm/experiments/config_files.py).
    packages=find_packages(include=["robust_admm", "robust_admm.*"]) + ["robust_admm.configs"],
    package_dir={"robust_admm.configs": "configs"},
    package_data={"robust_admm.configs": ["studies/*.py"]},
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "numpy>=1.26",
        "tensorflow-datasets>=4.9.7",
        # tfds.data_source(..., download=True) needs it (tensorflow-datasets 4.9.10).
        "importlib_resources",
        # The 8x8 handwritten digits of the offline quick start ship inside scikit-learn.
        "scikit-learn>=1.3",
        "absl-py",
        # Plots of the evaluation (robust accuracy versus epsilon) and of reports.
        "matplotlib>=3.7",
        # Image files: decoding and the standard crops (robust_admm/data/images.py).
        "pillow>=10",
        # Streamed batches read by worker processes (robust_admm/data/stream.py).
        "grain>=0.2.12",
        # init.pretrained: torchvision's and timm's weights saved as safetensors, read
        # into numpy without PyTorch (robust_admm/models/pretrained.py).
        "safetensors>=0.4",
    ],
    # `robust-admm train|eval|export|study|report`, as `python -m robust_admm.<verb>`.
    entry_points={"console_scripts": ["robust-admm = robust_admm.cli:main"]},
    # The suite runs on two workers (pytest.ini).
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
        # ONNX export (robust_admm/experiments/onnx_export.py). jax2onnx 0.17 requires
        # orbax-checkpoint < 0.11.37, so this extra installs orbax-checkpoint 0.11.36.
        # onnx is imported directly (it also comes with jax2onnx).
        "onnx": ["jax2onnx>=0.17", "onnx", "onnxruntime>=1.24"],
    },
)
