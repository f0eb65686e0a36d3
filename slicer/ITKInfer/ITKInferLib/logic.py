"""Volume node in, segmentation node out, through ``itk_infer serve``.

Three steps so the module's widget can keep the UI responsive: ``prepare`` (MRML: write the
volume to a temporary NRRD, on the caller's thread), ``request`` (network only, safe on a
worker thread), ``apply`` (MRML: load the label map into a segmentation node, caller's
thread). ``segment`` runs all three in a row. No Qt here, so this runs under ``slicer-core``.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
from ITKInferLib.client import InferAnswer, InferClient

# Segment colours when the model gives none: distinct, readable on grey images.
DEFAULT_COLORS = [(0.90, 0.30, 0.24), (0.18, 0.55, 0.90), (0.30, 0.75, 0.35),
                  (0.95, 0.77, 0.20), (0.60, 0.35, 0.80), (0.20, 0.80, 0.80),
                  (0.95, 0.50, 0.10), (0.85, 0.40, 0.70)]


@dataclass
class Prepared:
    """A volume written for upload: its temporary folder and file."""

    folder: Path
    path: Path
    volume_id: str


@dataclass
class SegmentResult:
    """What one run produced."""

    segmentation: Any  # vtkMRMLSegmentationNode
    label_names: dict[str, int]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def segment_names(self) -> list[str]:
        seg = self.segmentation.GetSegmentation()
        return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


class ITKInferLogic:
    """Runs a server's model on volume nodes of one MRML scene."""

    def __init__(self, scene: Any = None) -> None:
        self.scene = scene if scene is not None else getattr(slicer, "mrmlScene", None)
        if self.scene is None:
            raise ValueError("no MRML scene: pass one (slicer-core has no global scene)")

    def prepare(self, volume: Any) -> Prepared:
        """Write ``volume`` (a vtkMRMLScalarVolumeNode) to a temporary NRRD: the format
        Slicer's own MONAILabel module sends, geometry included."""
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or \
                volume.IsA("vtkMRMLLabelMapVolumeNode") or volume.GetImageData() is None:
            raise ValueError("select a scalar volume with image data")
        folder = Path(tempfile.mkdtemp(prefix="itkinfer-"))
        path = folder / "volume.nrrd"
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetUseCompression(False)  # faster; the link is loopback or a tunnel
            if not storage.WriteData(volume) or not path.is_file():
                raise OSError(f"could not write {volume.GetName()!r} to a temporary NRRD")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            self.scene.RemoveNode(storage)
        return Prepared(folder, path, volume.GetID())

    @staticmethod
    def request(client: InferClient, model: str, prepared: Prepared) -> InferAnswer:
        """Upload and infer; network only, so it may run on a worker thread."""
        client.connect()
        image_id = client.upload(prepared.path, f"slicer-{uuid.uuid4().hex}")
        return client.infer(model, image_id, ".nrrd")

    def apply(self, prepared: Prepared, answer: InferAnswer, name: str | None = None,
              colors: dict[str, Any] | None = None) -> SegmentResult:
        """Load the answer's label map as a new segmentation node: one segment per server
        label, in label order, named as the server names them (empty when not found)."""
        volume = self.scene.GetNodeByID(prepared.volume_id)
        if volume is None:
            raise ValueError("the volume was removed from the scene while it was segmented")
        labels = answer.label_names
        path = prepared.folder / Path(answer.filename).name
        if path.suffix != ".nrrd":
            path = prepared.folder / "result.nrrd"
        path.write_bytes(answer.data)
        labelmap = self._read_labelmap(path)
        try:
            model = answer.params.get("model", "ITKInfer")
            segmentation = self.scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", name or f"{volume.GetName()} {model}")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            self._import(labelmap, segmentation, labels, colors or {})
        finally:
            self.scene.RemoveNode(labelmap)
        return SegmentResult(segmentation, labels, answer.params)

    def segment(self, client: InferClient, model: str, volume: Any,
                name: str | None = None) -> SegmentResult:
        """``prepare``, ``request`` and ``apply`` on this thread."""
        prepared = self.prepare(volume)
        try:
            answer = self.request(client, model, prepared)
            return self.apply(prepared, answer, name, model_colors(client, model))
        finally:
            self.cleanup(prepared)

    @staticmethod
    def cleanup(prepared: Prepared) -> None:
        shutil.rmtree(prepared.folder, ignore_errors=True)

    def _read_labelmap(self, path: Path) -> Any:
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "itkinfer-result")
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            if not storage.ReadData(labelmap):
                self.scene.RemoveNode(labelmap)
                raise OSError("the server's label map could not be read")
        finally:
            self.scene.RemoveNode(storage)
        return labelmap

    @staticmethod
    def _import(labelmap: Any, segmentation: Any, labels: dict[str, int],
                colors: dict[str, Any]) -> None:
        """One segment per label value; Slicer's importer keeps each value as the segment's
        label value, which is how segments are matched to the server's names."""
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                labelmap, segmentation):
            raise OSError("Slicer could not import the label map")
        seg = segmentation.GetSegmentation()
        by_value = {seg.GetNthSegment(i).GetLabelValue(): seg.GetNthSegmentID(i)
                    for i in range(seg.GetNumberOfSegments())}
        names = {value: name for name, value in labels.items()}
        for value in sorted(set(by_value) - set(names)):  # a value the server did not name
            names[value] = f"label_{value}"
        for index, value in enumerate(sorted(names)):
            name = names[value]
            color = tuple(colors.get(name) or DEFAULT_COLORS[index % len(DEFAULT_COLORS)])
            if value in by_value:
                segment = seg.GetSegment(by_value[value])
                segment.SetName(name)
                segment.SetColor(*color[:3])
            else:  # absent from this image: still listed, so every label can be edited
                seg.AddEmptySegment(f"{name}", name, color[:3])
        order = [by_value.get(value) or seg.GetSegmentIdBySegmentName(names[value])
                 for value in sorted(names)]
        for index, segment_id in enumerate(order):
            seg.SetSegmentIndex(segment_id, index)


def model_colors(client: InferClient, model: str) -> dict[str, Any]:
    """``{label name: (r, g, b)}`` in 0..1 if the model's ``/info/`` entry gives colours
    (``label_colors``); empty otherwise. Failure to fetch them is not an error."""
    try:
        entry = client.models().get(model) or {}
    except Exception:  # colours are cosmetic; the run itself reports real errors
        return {}
    colors = entry.get("label_colors") or {}
    out = {}
    for name, value in colors.items() if isinstance(colors, dict) else ():
        try:
            rgb = [float(c) for c in value][:3]
        except (TypeError, ValueError):
            continue
        out[str(name)] = tuple(c / 255.0 if max(rgb) > 1 else c for c in rgb)
    return out
