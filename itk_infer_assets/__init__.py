"""Dagster code location for itk_infer: per-image partitions, GPU inference, confidences and
a folder sensor (load with ``dagster dev -w workspace.yaml`` or ``-m itk_infer_assets``)."""

from itk_infer_assets.definitions import defs

__all__ = ["defs"]
