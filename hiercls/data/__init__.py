"""Datasets (folders, manifests, groups), grouped splits, the decoded-image cache, the audit and coverage."""

from hiercls.data.audit import AuditReport, audit
from hiercls.data.cache import ImageCache, default_cache_dir
from hiercls.data.coverage import check_training_coverage
from hiercls.data.dataset import DataWarning, Exclusions, ImageTable, load_images, run_exclusions, write_manifest
from hiercls.data.images import IMAGE_EXTENSIONS, open_rgb
from hiercls.data.splits import (
    group_warning,
    grouped_kfold,
    grouped_train_val_split,
    split_count_table,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "AuditReport",
    "DataWarning",
    "Exclusions",
    "ImageCache",
    "ImageTable",
    "audit",
    "check_training_coverage",
    "default_cache_dir",
    "group_warning",
    "grouped_kfold",
    "grouped_train_val_split",
    "load_images",
    "open_rgb",
    "run_exclusions",
    "split_count_table",
    "write_manifest",
]
