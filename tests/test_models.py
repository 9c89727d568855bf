"""Network factory, EMA and the code-free weight and checkpoint files."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import torch
import torch.nn as nn

from medidiff.errors import ConfigError, ModelFolderError
from medidiff.models import (
    EMA,
    build_unet,
    count_parameters,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    sha256_file,
    spatial_multiple,
)
from medidiff.models.checkpoint import HASH_MISMATCH, UNSAFE
from tests.helpers import REPO, random_model

TINY = {
    "channels": (16, 32),
    "attention_levels": (False, True),
    "norm_num_groups": 8,
    "num_head_channels": 16,
    "num_res_blocks": 1,
}


def _wake(net: nn.Module) -> nn.Module:
    """MONAI zero-initialises the output convolution and every residual block's second
    convolution (so a new network ignores timesteps and classes); give them weights."""
    torch.manual_seed(0)
    for p in net.parameters():
        if p.dim() > 1 and not p.any():
            nn.init.normal_(p, std=0.1)
    return net.eval()


@pytest.mark.parametrize("spatial_dims,size", [(2, (16, 16)), (3, (8, 8, 8))])
def test_tiny_unet_forward(spatial_dims, size):
    net = build_unet(spatial_dims, in_channels=2, out_channels=1, **TINY)
    x = torch.randn(2, 2, *size)
    with torch.no_grad():
        y = net(x, timesteps=torch.tensor([3, 700]))
    assert y.shape == (2, 1, *size)
    assert torch.count_nonzero(y) == 0  # zero-initialised output layer
    assert 10_000 < count_parameters(net) < 1_000_000
    assert all(s % spatial_multiple(TINY["channels"]) == 0 for s in size)


def test_class_labels_change_the_output_when_num_class_embeds_is_set():
    net = _wake(build_unet(2, 1, 1, num_class_embeds=3, **TINY))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        a = net(x, timesteps=t, class_labels=torch.tensor([0, 0]))
        b = net(x, timesteps=t, class_labels=torch.tensor([0, 2]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_monai_silently_ignores_class_labels_without_num_class_embeds():
    """Documents the MONAI pitfall: no error and no effect, so conditioning must set it."""
    net = _wake(build_unet(2, 1, 1, **TINY))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    with torch.no_grad():
        a = net(x, timesteps=t, class_labels=torch.tensor([0, 1]))
        b = net(x, timesteps=t, class_labels=torch.tensor([5, 9]))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change,key",
    [
        ({"channels": (16, 30)}, "channels"),
        ({"attention_levels": (False, True, True)}, "attention_levels"),
        ({"num_head_channels": 12}, "num_head_channels"),  # 32 (mid block) is not a multiple of 12
        ({"attention_levels": (True, True), "num_head_channels": 32}, "num_head_channels"),
        ({"num_res_blocks": (1, 1, 1)}, "num_res_blocks"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"num_class_embeds": 0}, "num_class_embeds"),
        ({"dropout_cattn": 1.5}, "dropout_cattn"),
        ({"spatial_dims": 4}, "spatial_dims"),
    ],
)
def test_bad_network_config_names_the_key(change, key):
    kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, **TINY, **change}
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_unet(**kwargs)


def test_default_unet_builds():
    net = build_unet(2, 1, 1)
    assert [b.resnets[0].out_channels for b in net.down_blocks] == [32, 64, 64]


def test_attention_through_sdpa_matches_the_explicit_attention_matrix():
    from monai.networks.nets import DiffusionModelUNet

    kwargs = dict(channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                  num_head_channels=8, norm_num_groups=8)
    net = build_unet(2, 1, 1, **kwargs)
    assert all(m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention"))
    explicit = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, **kwargs)
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p, std=0.1)  # the last convolution starts at zero: make it matter
    explicit.load_state_dict(net.state_dict())  # same parameters, only the kernel differs
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.allclose(net(x, timesteps=t), explicit(x, timesteps=t), atol=1e-5)


# ---- EMA ----------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("running", torch.zeros(2))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))


def test_ema_constant_decay_is_exponential_averaging():
    model = Toy()
    ema = EMA(model, decay=0.9, warmup=False)
    expected = torch.zeros(2)
    for k in range(1, 6):
        with torch.no_grad():
            model.w.fill_(float(k))
            model.running.fill_(-float(k))
            model.count.fill_(k)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * k
        assert torch.allclose(ema.shadow["w"], expected)
        assert torch.allclose(ema.shadow["running"], -expected)
        assert ema.shadow["count"].item() == k  # integer buffers are copied


def test_ema_warmup_and_update_after_step():
    ema = EMA(Toy(), decay=0.999, power=0.75, update_after_step=2)
    assert ema.current_decay(1) == ema.current_decay(2) == 0.0  # plain copies first
    assert ema.current_decay(3) == pytest.approx(1 - 2**-0.75)
    assert ema.current_decay(10**9) == 0.999
    assert EMA(Toy(), decay=0.5, warmup=False).current_decay(1) == 0.5
    decays = [ema.current_decay(n) for n in range(3, 2000)]
    assert all(a <= b for a, b in zip(decays, decays[1:], strict=False))


def test_ema_copy_to_and_state_dict_round_trip():
    model = Toy()
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.w.fill_(4.0)
    ema.update(model)
    other = EMA(Toy(), decay=0.5, warmup=False)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["w"], torch.full((2,), 2.0))
    target = Toy()
    other.copy_to(target)
    assert torch.equal(target.w.data, torch.full((2,), 2.0))
    assert torch.equal(model.w.data, torch.full((2,), 4.0))  # the live model is untouched


def test_ema_unwraps_a_wrapper_with_module_attribute():
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = Toy()
    ema = EMA(Wrapper(model), decay=0.0, warmup=False)
    assert set(ema.shadow) == {"w", "running", "count"}
    with torch.no_grad():
        model.w.fill_(1.0)
    ema.update(Wrapper(model))
    assert torch.equal(ema.shadow["w"], torch.ones(2))


# ---- weights and checkpoints --------------------------------------------------------------


def test_weights_round_trip_and_hash(tmp_path):
    net = build_unet(2, 1, 1, **TINY)
    path = tmp_path / "model.safetensors"
    digest = save_weights(net.state_dict(), path)
    assert digest == sha256_file(path) and len(digest) == 64
    loaded = load_weights(path, expected_sha256=digest)
    assert loaded.keys() == net.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_weights_with_shared_storage_are_saved(tmp_path):
    w = torch.randn(3, 3)
    save_weights({"a": w, "b": w, "c": w[0]}, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w[0])


def test_truncated_weights_fail_the_hash_check(tmp_path):
    path = tmp_path / "model.safetensors"
    digest = save_weights({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFolderError) as err:
        load_weights(path, expected_sha256=digest)
    assert HASH_MISMATCH in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ModelFolderError, match="not a readable safetensors"):
        load_weights(path)
    with pytest.raises(ModelFolderError, match="cannot read weights"):
        load_weights(tmp_path / "missing.safetensors")


def test_pickle_is_not_accepted_as_weights(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ModelFolderError, match="not a readable safetensors"):
        load_weights(path)


def _training_state():
    net = nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    return net, opt


def test_checkpoint_round_trip_with_optimizer_and_rng(tmp_path):
    net, opt = _training_state()
    ema = EMA(net)
    ema.update(net)
    random.seed(3)
    payload = {
        "model": net.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 17,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(),
    }
    path = save_checkpoint(tmp_path / "ckpt" / "last.pt", payload)
    expected_next = torch.rand(3)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 17
    torch.set_rng_state(loaded["rng"]["torch"])
    assert torch.equal(torch.rand(3), expected_next)
    random.setstate(loaded["rng"]["python"])
    assert random.random() == (random.seed(3) or random.random())
    net2, opt2 = _training_state()
    net2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    state, state2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert all(torch.equal(torch.as_tensor(state[k]), torch.as_tensor(state2[k])) for k in state)
    EMA(net2).load_state_dict(loaded["ema"])


def test_checkpoint_refuses_what_it_could_not_load_safely(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"\['rng'\]"):
        save_checkpoint(tmp_path / "c.pt", {"rng": np.random.get_state()})
    assert not (tmp_path / "c.pt").exists()


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"step": 1, "model": _Exploit(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ModelFolderError) as err:
        load_checkpoint(path)
    assert UNSAFE in str(err.value)
    assert not marker.exists()


def test_damaged_or_missing_checkpoint_is_a_model_folder_error(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFolderError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ModelFolderError, match="missing"):
        load_checkpoint(tmp_path / "nope.pt")


# -- the model folder -----------------------------------------------------------------------------


def _model_folder(folder):
    return random_model(folder, "anomaly")


@pytest.mark.parametrize("found", ["medidiff-model/2", "other-tool/1", None, 1, "missing"])
def test_model_folder_of_another_format_is_refused_in_one_line(tmp_path, found):
    import yaml

    from medidiff.tasks.registry import load_model

    folder = _model_folder(tmp_path / "model")
    meta = yaml.safe_load((folder / "model.yaml").read_text())
    if found == "missing":
        del meta["format"]
    else:
        meta["format"] = found
    (folder / "model.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(ModelFolderError) as err:
        load_model(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / "model.yaml") in message
    assert "this medidiff reads 'medidiff-model/1'" in message
    if found == "missing":
        assert "no 'format' key" in message
    else:
        assert f"newer or foreign tool (format {found!r})" in message


def test_model_folder_loads_through_the_registry_with_its_task(tmp_path):
    from medidiff.models import folder as model_folder
    from medidiff.tasks.registry import get_task, load_model

    folder = _model_folder(tmp_path / "model")
    assert load_model(folder).task == "anomaly"
    assert load_model(folder, task="anomaly", device="cpu").net.training is False
    with pytest.raises(ModelFolderError, match="holds a 'anomaly' model, not a 'segment' model"):
        load_model(folder, task="segment")
    with pytest.raises(ModelFolderError, match="not a 'denoise' model"):
        model_folder.load_model(folder, get_task("denoise"))
    with pytest.raises(ConfigError, match="task 'nope' is not available"):
        get_task("nope")


def test_models_import_no_task():
    """Layering: models sit below tasks, so no module of medidiff.models imports medidiff.tasks
    (not even inside a function)."""
    import ast

    package = REPO / "medidiff" / "models"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith("medidiff.tasks")], path.name
