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
    "ConfigError",
    "DataError",
    "HierclsError",
    "NodeProbabilities",
    "Taxonomy",
    "TaxonomyError",
    "load_taxonomy",
    "__version__",
]
