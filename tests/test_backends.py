"""Inference backends: each gives eager PyTorch's maps; exported graphs are cached and checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medidiff.errors import ConfigError
from medidiff.inference import backends

from .helpers import head

EXPORTED = [b for b in ("onnx", "openvino") if backends.available(b)]


def test_unknown_or_impossible_backends_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="unknown backend 'tensorrt'"):
        backends.resolve("tensorrt", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CPU only"):
        backends.resolve("onnx", torch.device("cuda"))
    assert backends.resolve("auto", torch.device("cuda")) == "eager"
    monkeypatch.setattr(backends, "available", lambda name: name != "openvino")
    assert backends.resolve("auto", torch.device("cpu")) == "onnx"
    monkeypatch.setattr(backends, "available", lambda name: name not in ("onnx", "openvino"))
    with pytest.raises(ConfigError, match=r"pip install 'medidiff\[openvino\]'"):
        backends.resolve("openvino", torch.device("cpu"))
    assert backends.resolve("auto", torch.device("cpu")) == "eager"  # no runtime: still runs


def _score(model, backend, volume):
    from medidiff.api import AnomalyDetector

    detector = AnomalyDetector.load(model, device="cpu", backend=backend)
    assert detector.describe()["backend"] == backend
    return detector, detector.score_grid(volume)


@pytest.mark.parametrize("backend", EXPORTED)
def test_exported_backends_give_the_eager_maps(tiny_model, backend):
    volume = torch.from_numpy(head((24, 24, 12)))[None]
    detector, eager = _score(tiny_model, "eager", volume)
    _, other = _score(tiny_model, backend, volume)
    spread = float(eager.anomaly_map.max() - eager.anomaly_map.min())
    assert spread > 0
    assert np.abs(other.anomaly_map - eager.anomaly_map).max() <= 1e-3 * spread
    threshold = detector.entry["voxel_threshold"]
    assert np.array_equal(other.anomaly_map >= threshold, eager.anomaly_map >= threshold)
    assert abs(other.score - eager.score) <= 1e-3 * spread


def _graphs(model):
    return sorted((model / backends.EXPORTS).glob("*.onnx"))


@pytest.mark.skipif(not EXPORTED, reason="no ONNX runtime installed (optional extra)")
def test_the_exported_graph_is_cached_and_a_tampered_one_is_never_run(tiny_model, monkeypatch):
    volume = torch.from_numpy(head((24, 24, 12)))[None]
    backend = EXPORTED[0]
    _, first = _score(tiny_model, backend, volume)
    graphs = _graphs(tiny_model)
    assert graphs and all(g.with_suffix(".json").is_file() for g in graphs)
    record = json.loads(graphs[0].with_suffix(".json").read_text())
    assert record["weights_sha256"] == _weights_sha(tiny_model)

    exports = []
    original = backends.ExportedNet._export
    monkeypatch.setattr(backends.ExportedNet, "_export",
                        lambda self, *a: exports.append(1) or original(self, *a))
    _, again = _score(tiny_model, backend, volume)
    assert exports == []  # read from the cache
    np.testing.assert_array_equal(again.anomaly_map, first.anomaly_map)

    graphs[0].write_bytes(graphs[0].read_bytes()[:-64] + b"\0" * 64)  # swapped or corrupted
    _, rebuilt = _score(tiny_model, backend, volume)
    assert exports  # not run: exported again from the checked weights
    np.testing.assert_array_equal(rebuilt.anomaly_map, first.anomaly_map)


def _weights_sha(model):
    import yaml

    return yaml.safe_load((model / "model.yaml").read_text())["weights"]["sha256"]


@pytest.mark.skipif(not EXPORTED, reason="no ONNX runtime installed (optional extra)")
def test_a_model_folder_that_cannot_be_written_exports_for_the_run_only(tmp_path, monkeypatch):
    from .helpers import random_model

    model = random_model(tmp_path / "model", "denoise")  # condition channels and class labels

    def refuse(path, data):
        raise PermissionError(path)

    monkeypatch.setattr(backends, "atomic_write_bytes", refuse)
    perturbed = _perturbed(model)
    net = backends.ExportedNet(perturbed, EXPORTED[0], model, "0" * 64)
    x = torch.randn(2, perturbed.in_channels, 16, 16)
    t, labels = torch.tensor([3, 5]), torch.tensor([1, 2])
    out = net(x, t, labels)
    with torch.no_grad():
        want = perturbed(x, timesteps=t, class_labels=labels)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-4)
    assert not _graphs(model)


def _perturbed(model_dir):
    """The folder's network with non-zero weights everywhere (a new network outputs zeros)."""
    from medidiff.tasks.registry import load_model

    net = load_model(model_dir, device="cpu").net
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return net.eval()


def test_compile_gives_the_eager_output(tmp_path):
    from .helpers import random_model

    net = _perturbed(random_model(tmp_path / "model", "anomaly"))
    compiled = backends.wrap(net, "compile", folder=None, weights_sha256=None)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 20])
    with torch.no_grad():
        np.testing.assert_allclose(compiled(x, timesteps=t).numpy(),
                                   net(x, timesteps=t).numpy(), atol=1e-4)


def test_presets_name_settings_that_options_override_and_calibrate_on_their_own(
        tiny_model, example_data, tmp_path):
    import shutil

    from medidiff.api import AnomalyDetector, calibrate
    from medidiff.tasks.anomaly.presets import PRESETS

    model = shutil.copytree(tiny_model, tmp_path / "model")
    fast = AnomalyDetector.load(model, device="cpu", preset="fast")
    assert fast.settings.sampler == PRESETS["fast"]["sampler"]
    assert fast.settings.draws == PRESETS["fast"]["draws"]
    assert AnomalyDetector.load(model, device="cpu", preset="fast", draws=3).settings.draws == 3
    default = AnomalyDetector.load(model, device="cpu", preset="default")
    assert default.settings == AnomalyDetector.load(model, device="cpu").settings
    with pytest.raises(ConfigError, match="unknown preset 'quick'"):
        AnomalyDetector.load(model, device="cpu", preset="quick")

    assert fast.entry is None  # never calibrated with these settings
    calibrate(model, example_data, device="cpu", methods=("diffusion",), preset="fast")
    fast = AnomalyDetector.load(model, device="cpu", preset="fast")
    assert fast.entry is not None and fast.entry["settings"]["sampler"] == "x0"
    default = AnomalyDetector.load(model, device="cpu")
    assert default.entry is not None and default.entry is not fast.entry
    assert default.entry["settings"] != fast.entry["settings"]
