"""How the network runs at inference: eager PyTorch, ``torch.compile``, or an exported ONNX graph
run by ONNX Runtime or OpenVINO (optional extras: ``pip install medidiff[onnx]`` or ``[openvino]``).

Every backend is called as the network is, ``net(x, timesteps=, class_labels=)``, and sits
under :class:`medidiff.models.batching.FixedBatch`, so it always sees one batch shape. The ONNX
graph is exported once per model folder and input shape and cached in ``<model>/exports/``
beside a record of its own sha256 and of the weights' sha256 it was traced from: a graph is run
only when both match (the weights' hash having been checked against ``model.yaml`` on loading),
the same check the weights pass; otherwise it is exported again. A folder that cannot be
written gets its graph in a temporary folder for the process.

``auto`` (the default) picks OpenVINO on the CPU when it is installed, else ONNX Runtime, else
eager PyTorch (and eager on GPUs): on a 2-core Xeon OpenVINO scored 1.09 times as fast as eager
with the same maps, ONNX Runtime 1.01 and ``torch.compile`` 0.90 (docs/benchmarks.md, "Scoring
speed on the CPU"); the network in float32 leaves little to gain there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from medidiff.errors import ConfigError
from medidiff.io.write import atomic_write_bytes, atomic_write_text
from medidiff.models.checkpoint import sha256_file
from medidiff.names import INFERENCE_BACKENDS

log = logging.getLogger("medidiff")

EXPORTS = "exports"  # the model folder's cache of exported graphs
EXPORT_FORMAT = 1  # bump when the exported graph's inputs or outputs change
OPSET = 17
_RUNTIME_MODULE = {"onnx": "onnxruntime", "openvino": "openvino"}
_EXTRA = {"onnx": "onnx", "openvino": "openvino"}


def available(backend: str) -> bool:
    module = _RUNTIME_MODULE.get(backend)
    if module is None:
        return True
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("onnx") is not None


def resolve(backend: str, device: torch.device) -> str:
    """The backend ``backend`` names on ``device`` (``auto`` resolved); refuse one that cannot
    run there."""
    if backend not in INFERENCE_BACKENDS:
        raise ConfigError(f"inference.backend: unknown backend {backend!r} "
                          f"(valid: {', '.join(INFERENCE_BACKENDS)})")
    if backend == "auto":
        if device.type != "cpu":
            return "eager"
        return next((b for b in ("openvino", "onnx") if available(b)), "eager")
    if backend in _RUNTIME_MODULE:
        if device.type != "cpu":
            raise ConfigError(f"inference.backend: '{backend}' runs on the CPU only "
                              f"(the device is {device}); use eager or compile")
        if not available(backend):
            raise ConfigError(f"inference.backend: '{backend}' needs {_RUNTIME_MODULE[backend]} "
                              f"and onnx: pip install 'medidiff[{_EXTRA[backend]}]'")
    return backend


def wrap(net: torch.nn.Module, backend: str, *, folder: Path | None, weights_sha256: str | None):
    """``net`` run by ``backend`` (already resolved), called as the network is."""
    if backend == "eager":
        return net
    if backend == "compile":
        return torch.compile(net, dynamic=False)
    return ExportedNet(net, backend, folder, weights_sha256)


class _Signature(torch.nn.Module):
    """The network with positional inputs, as the exporter traces it."""

    def __init__(self, net: torch.nn.Module, labels: bool):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x, timesteps, class_labels=None):
        return self.net(x, timesteps=timesteps, class_labels=class_labels if self.labels else None)


class ExportedNet:
    """The network as an ONNX graph, one per input shape, run by ONNX Runtime or OpenVINO."""

    def __init__(self, net: torch.nn.Module, runtime: str, folder: Path | None,
                 weights_sha256: str | None):
        self.net, self.runtime = net, runtime
        self.folder, self.weights_sha256 = folder, weights_sha256
        self.sessions: dict[tuple, object] = {}
        self._scratch: tempfile.TemporaryDirectory | None = None

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        key = (tuple(x.shape), str(x.dtype), class_labels is not None)
        if key not in self.sessions:
            self.sessions[key] = self._session(self._graph(x, timesteps, class_labels))
        feeds = [x.detach().cpu().numpy(), timesteps.detach().cpu().numpy().astype(np.int64)]
        if class_labels is not None:
            feeds.append(class_labels.detach().cpu().numpy().astype(np.int64))
        return torch.from_numpy(np.asarray(self.sessions[key](feeds))).to(x.device)

    # -- the cached graph ----------------------------------------------------------------------
    def _graph(self, x, timesteps, class_labels) -> Path:
        shape = ("x".join(str(s) for s in x.shape) + f"-{str(x.dtype).removeprefix('torch.')}"
                 + ("-labels" if class_labels is not None else ""))
        weights = (self.weights_sha256 or "unhashed")[:16]
        name = f"unet-{weights}-{shape}"
        folder = self._exports()
        graph, record = folder / f"{name}.onnx", folder / f"{name}.json"
        expected = {"format": EXPORT_FORMAT, "weights_sha256": self.weights_sha256,
                    "input_shape": list(x.shape), "input_dtype": str(x.dtype),
                    "class_labels": class_labels is not None}
        if graph.is_file() and record.is_file() and self.weights_sha256:
            with contextlib.suppress(OSError, ValueError):
                meta = json.loads(record.read_text())
                if ({k: meta.get(k) for k in expected} == expected
                        and sha256_file(graph) == meta.get("sha256")):
                    return graph
        data = self._export(x, timesteps, class_labels)
        try:
            atomic_write_bytes(graph, data)
            atomic_write_text(record, json.dumps({**expected, "sha256": hashlib.sha256(data).hexdigest(),
                                                  "torch": torch.__version__}, indent=1))
        except OSError:
            folder = self._scratch_folder()
            graph = folder / f"{name}.onnx"
            graph.write_bytes(data)
            log.warning("could not cache the exported network in %s; exported for this run only",
                        self.folder)
        return graph

    def _exports(self) -> Path:
        if self.folder is not None and self.weights_sha256:
            folder = Path(self.folder) / EXPORTS
            with contextlib.suppress(OSError):
                folder.mkdir(exist_ok=True)
                if os.access(folder, os.W_OK):
                    return folder
        return self._scratch_folder()

    def _scratch_folder(self) -> Path:
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="medidiff-export-")
        return Path(self._scratch.name)

    def _export(self, x, timesteps, class_labels) -> bytes:
        labels = class_labels is not None
        module = _Signature(self.net, labels).eval()
        args = (x, timesteps) + ((class_labels,) if labels else ())  # on the CPU (resolve)
        names = ["x", "timesteps"] + (["class_labels"] if labels else [])
        buffer = io.BytesIO()
        log.info("exporting the network to ONNX for input %s (once per model folder)",
                 tuple(x.shape))
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # the TorchScript exporter: a few seconds, where the dynamo exporter takes 15 s
            torch.onnx.export(module, args, buffer, input_names=names, output_names=["out"],
                              opset_version=OPSET, dynamo=False)
        return buffer.getvalue()

    # -- the runtimes --------------------------------------------------------------------------
    def _session(self, graph: Path):
        threads = max(1, torch.get_num_threads())
        if self.runtime == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.log_severity_level = 3
            session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            return lambda feeds: session.run(None, dict(zip(names, feeds, strict=True)))[0]
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(graph), "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
                                "PERFORMANCE_HINT": "LATENCY"})
        return lambda feeds: compiled(feeds)[0]
