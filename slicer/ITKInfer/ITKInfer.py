"""ITKInfer: a 3D Slicer panel that segments the current volume with an ``itk_infer serve``
server. Thin Qt layer only: every behaviour is in ``ITKInferLib`` (tested without Slicer's
GUI). The network part runs on a worker thread; a QTimer polls it, so the UI never freezes,
and MRML is only touched on the main thread.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import qt
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget

import slicer

sys.path.insert(0, os.path.dirname(__file__))  # ITKInferLib sits next to this file

from ITKInferLib import InferClient, ITKInferLogic
from ITKInferLib.logic import model_colors


class ITKInfer(ScriptedLoadableModule):
    def __init__(self, parent: Any) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        parent.title = "ITKInfer"
        parent.categories = ["Segmentation"]
        parent.contributors = ["itk_infer"]
        parent.helpText = ("Segment the selected volume with a model served by "
                           "'itk_infer serve'. Enter the server URL (and token if it has one), "
                           "press Connect, pick a model and press Run.")
        parent.acknowledgementText = ""


class ITKInferWidget(ScriptedLoadableModuleWidget):
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = ITKInferLogic(slicer.mrmlScene)
        self.job: dict[str, Any] | None = None
        form = qt.QFormLayout()
        self.layout.addLayout(form)
        self.url = qt.QLineEdit(qt.QSettings().value("ITKInfer/url", "http://127.0.0.1:8000"))
        self.token = qt.QLineEdit()
        self.token.setEchoMode(qt.QLineEdit.Password)  # never shown, never saved
        self.connect_button = qt.QPushButton("Connect")
        self.models = qt.QComboBox()
        self.volume = slicer.qMRMLNodeComboBox()
        self.volume.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volume.setMRMLScene(slicer.mrmlScene)
        self.volume.addEnabled = self.volume.removeEnabled = False
        self.run_button = qt.QPushButton("Run")
        self.status = qt.QLabel("")
        self.status.wordWrap = True
        for label, widget in (("Server URL:", self.url), ("Token:", self.token),
                              ("", self.connect_button), ("Model:", self.models),
                              ("Volume:", self.volume), ("", self.run_button),
                              ("Status:", self.status)):
            form.addRow(label, widget)
        self.layout.addStretch(1)
        self.connect_button.connect("clicked()", self.on_connect)
        self.run_button.connect("clicked()", self.on_run)
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.poll)

    def client(self) -> InferClient:
        qt.QSettings().setValue("ITKInfer/url", self.url.text)
        return InferClient(self.url.text, self.token.text or None)

    def on_connect(self) -> None:
        self.start("connect", lambda client: (client.connect(), client.models())[1])

    def on_run(self) -> None:
        model, volume = self.models.currentText, self.volume.currentNode()
        if not model:
            self.status.text = "Connect and pick a model first."
            return
        try:
            prepared = self.logic.prepare(volume)  # MRML: main thread
        except Exception as error:
            self.status.text = f"Error: {error}"
            return

        def work(client: InferClient) -> Any:
            return ITKInferLogic.request(client, model, prepared), model_colors(client, model)
        self.start("run", work, prepared)

    def start(self, kind: str, work: Any, prepared: Any = None) -> None:
        client = None
        try:
            if self.job is None:
                client = self.client()
        except ValueError as error:
            self.status.text = f"Error: {error}"
        if client is None:  # busy, or a bad URL: drop the temporary file now
            if prepared is not None:
                ITKInferLogic.cleanup(prepared)
            return
        job: dict[str, Any] = {"kind": kind, "prepared": prepared}

        def target() -> None:
            try:
                job["result"] = work(client)
            except Exception as error:  # shown in the panel, with the server's message
                job["error"] = error
        job["thread"] = threading.Thread(target=target, daemon=True)
        self.job = job
        self.set_busy(True, "Connecting..." if kind == "connect" else "Running on the server...")
        job["thread"].start()
        self.timer.start()

    def poll(self) -> None:
        job = self.job
        if job is None or job["thread"].is_alive():
            return
        self.timer.stop()
        self.job = None
        self.set_busy(False, "")
        try:
            if "error" in job:
                self.status.text = f"Error: {job['error']}"
            elif job["kind"] == "connect":
                self.models.clear()
                for name in job["result"]:
                    self.models.addItem(name)
                self.status.text = f"Connected: {self.models.count} model(s)."
            else:
                answer, colors = job["result"]
                result = self.logic.apply(job["prepared"], answer, colors=colors)  # MRML
                self.status.text = ("Done: " + ", ".join(result.segment_names))
        except Exception as error:
            self.status.text = f"Error: {error}"
        finally:
            if job["prepared"] is not None:
                ITKInferLogic.cleanup(job["prepared"])

    def set_busy(self, busy: bool, text: str) -> None:
        self.run_button.enabled = self.connect_button.enabled = not busy
        if text:
            self.status.text = text

    def cleanup(self) -> None:
        self.timer.stop()
