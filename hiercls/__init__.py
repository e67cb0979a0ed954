"""hiercls: hierarchical image classification on any label tree and any timm backbone."""

from hiercls.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    HierclsError,
    TaxonomyError,
)
from hiercls.probabilities import NodeProbabilities
from hiercls.taxonomy import Taxonomy, load_taxonomy

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "HierarchicalImageClassifier",
    "ConfigError",
    "DataError",
    "HierclsError",
    "NodeProbabilities",
    "Taxonomy",
    "TaxonomyError",
    "load_taxonomy",
    "__version__",
]


def __getattr__(name: str):
    # imported on first use: the estimator pulls in scikit-learn, which the CLI does not need
    if name == "HierarchicalImageClassifier":
        from hiercls.estimator import HierarchicalImageClassifier

        return HierarchicalImageClassifier
    raise AttributeError(f"module 'hiercls' has no attribute {name!r}")
