"""The Qt-free part of the ITKInfer Slicer module: an HTTP client for ``itk_infer serve``
(stdlib only) and the logic that turns a volume node into a segmentation node."""

from ITKInferLib.client import InferAnswer, InferClient, ServerError, Unreachable
from ITKInferLib.logic import ITKInferLogic, SegmentResult

__all__ = ["ITKInferLogic", "InferAnswer", "InferClient", "SegmentResult", "ServerError",
           "Unreachable"]
