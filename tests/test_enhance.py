"""Denoising and super-resolution: training pairs, conditioning, geometry, zero-shot, bad input."""

import hashlib
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medidiff.api import Denoiser, SuperResolver
from medidiff.config import load_config
from medidiff.data import degrade
from medidiff.errors import InputError, ModelFolderError
from medidiff.models.folder import build_network
from medidiff.tasks.enhance import denoise, superres
from medidiff.tasks.enhance.denoise import estimate_sigma, noise_label, sdedit_timestep
from medidiff.tasks.enhance.superres import fine_affine, scale_label
from medidiff.tasks.registry import get_task
from tests.helpers import REPO, run_cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared CPU two OpenMP threads can run many times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(task: str, preset: str = "cpu-tiny", *overrides: str):
    return load_config(REPO / "configs" / task / f"{preset}.yaml", list(overrides))


def _train(tmp_path_factory, data: Path, task: str, preset: str) -> Path:
    from medidiff.training.trainer import run_training

    out = tmp_path_factory.mktemp("enhance") / f"{task}-{preset}"
    run_training(_config(task, preset, "train.steps=4"), data, out, task=get_task(task))
    return out


@pytest.fixture(scope="module")
def denoise_model(tmp_path_factory, example_data) -> Path:
    return _train(tmp_path_factory, example_data, "denoise", "cpu-tiny")


@pytest.fixture(scope="module")
def superres_model(tmp_path_factory, example_data) -> Path:
    return _train(tmp_path_factory, example_data, "superres", "cpu-tiny")


def _copy(example_data: Path, kind: str) -> Path:
    entry = json.loads((example_data / "dataset.json").read_text())["enhance"][0]
    return example_data / entry[kind]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batch(channels: int = 3, size=(32, 32), seed: int = 0) -> torch.Tensor:
    """Smooth positive 'heads' with a zero background, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in size], indexing="ij")
    head = ((yy**2 + xx**2) < 0.6).float()
    base = 0.4 + 0.5 * torch.rand((4, 1, 1, 1), generator=g) * (1 + torch.sin(3 * xx))
    return (base * head).clamp(0, 1).repeat(1, channels, 1, 1)


# -- training pairs ------------------------------------------------------------------------------
def test_denoise_pairs_add_noise_of_the_drawn_level():
    cfg = _config("denoise", "cpu-tiny", "denoise.noise=[gaussian]", "denoise.sigma_range=[0.1,0.1]",
                  "denoise.foreground_only=0", "denoise.intensity_jitter=0")
    image = _batch()
    inputs = get_task("denoise").training_inputs({"image": image}, cfg, torch.Generator().manual_seed(1))
    assert inputs.condition.shape == (4, 3, 32, 32)  # the slice and one neighbour on each side
    noisy = (inputs.condition + 1) / 2
    reference = degrade.reference_intensity(image[:, 1:2], image[:, 1:2] > 0)
    assert (noisy - image).std(dim=(1, 2, 3)).tolist() == pytest.approx((0.1 * reference).tolist(),
                                                                        rel=0.1)
    assert torch.equal(inputs.class_labels, noise_label(0.1 * reference, cfg))
    # the target is the residual from the noisy slice, in units of twice its sigma
    unit = denoise.residual_unit(0.1 * reference).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy[:, 1:2] + unit * inputs.target, image[:, 1:2])
    assert inputs.target.std() == pytest.approx(0.5, rel=0.1)


def test_rician_pairs_have_a_positive_noise_floor_and_head_only_option():
    cfg = _config("denoise", "cpu-tiny", "denoise.noise=rician", "denoise.foreground_only=1")
    image = _batch()
    inputs = get_task("denoise").training_inputs({"image": image}, cfg, torch.Generator().manual_seed(2))
    noisy = (inputs.condition + 1) / 2
    assert (noisy >= 0).all()  # a magnitude image
    assert (noisy[image == 0] == 0).all()  # noise only inside the head (skull-stripped scans)
    everywhere = _config("denoise", "cpu-tiny", "denoise.noise=rician", "denoise.foreground_only=0")
    noisy = (get_task("denoise").training_inputs({"image": image}, everywhere,
                                                 torch.Generator().manual_seed(2)).condition + 1) / 2
    assert noisy[image == 0].mean() > 0.01  # the Rayleigh floor of the background


def test_superres_pairs_are_averaged_then_interpolated_in_plane():
    cfg = _config("superres", "cpu-tiny", "superres.intensity_jitter=0")
    image = _batch(channels=1, size=(32, 48))
    inputs = get_task("superres").training_inputs({"image": image}, cfg, torch.Generator().manual_seed(0))
    assert inputs.condition.shape == inputs.target.shape == (4, 1, 32, 48)
    for i, label in enumerate(inputs.class_labels.tolist()):
        scale = cfg.superres.scales[label]
        low = degrade.downsample(image[i:i + 1], scale, dims=(0, 1))
        expected = degrade.upsample_to(low, (32, 48), factor=scale)
        torch.testing.assert_close((inputs.condition[i:i + 1] + 1) / 2, expected, rtol=1e-4, atol=1e-4)
        fine = expected + superres.residual_unit(scale) * inputs.target[i:i + 1]
        torch.testing.assert_close(fine, image[i:i + 1], rtol=1e-4, atol=1e-4)


def test_superres_3d_pairs_degrade_through_plane_only():
    cfg = _config("superres", "cpu-tiny-3d", "superres.intensity_jitter=0")
    profile = torch.linspace(0, 1, 16)
    image = profile[None, None, :, None, None].expand(2, 1, 16, 16, 16).clone()  # varies along axis 0
    inputs = get_task("superres").training_inputs({"image": image}, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(inputs.condition, image * 2 - 1)  # constant through-plane: no loss
    assert inputs.target.abs().max() < 1e-5


def test_slice_dataset_gives_neighbour_slices_as_channels(example_data):
    from medidiff.data.datasets import read_split, training_dataset

    cfg = _config("denoise").data
    entries = read_split(example_data, "training")[:1]
    plain = training_dataset(cfg, entries)
    context = training_dataset(cfg, entries, context=1)
    assert context.data["image"].shape[1] == 3
    torch.testing.assert_close(context.data["image"][:, 1:2], plain.data["image"])
    torch.testing.assert_close(context.data["image"][1:, 0], plain.data["image"][:-1, 0])


# -- conditioning ----------------------------------------------------------------------------------
@pytest.mark.parametrize("task,preset,channels", [("denoise", "cpu-tiny", 4), ("superres", "cpu-tiny", 2),
                                                  ("denoise", "cpu-tiny-3d", 2), ("superres", "cpu-tiny-3d", 2)])
def test_network_takes_condition_channels_and_class_labels(task, preset, channels):
    cfg = _config(task, preset)
    net = build_network(cfg, get_task(task))
    first = next(m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)))
    assert first.in_channels == channels  # noisy target first, then the condition
    assert net.class_embedding.num_embeddings == get_task(task).num_class_embeds(cfg)


def test_changing_class_labels_changes_the_output():
    cfg = _config("denoise")
    torch.manual_seed(0)
    net = build_network(cfg, get_task("denoise")).eval()
    with torch.no_grad():
        for p in net.parameters():  # the last layer starts at zero: give it weights
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        low = net(x, timesteps=t, class_labels=torch.tensor([0, 0]))
        high = net(x, timesteps=t, class_labels=torch.tensor([7, 7]))
    assert (low - high).abs().max() > 1e-3


def test_noise_level_reaches_a_trained_denoiser(denoise_model, example_data):
    scan = _copy(example_data, "noisy10")
    low = Denoiser.load(denoise_model, device="cpu", sigma=0.02).predict_file(scan)
    high = Denoiser.load(denoise_model, device="cpu", sigma=0.15).predict_file(scan)
    assert low.info["class_label"] != high.info["class_label"]
    assert np.abs(low.image - high.image).max() > 1e-4


def test_labels_of_untrained_levels_and_scales_clamp_to_the_nearest():
    cfg = _config("superres")
    assert [scale_label(f, cfg) for f in (2, 3, 4, 8)] == [0, 1, 1, 1]
    cfg = _config("denoise")
    assert noise_label(torch.tensor([0.0, 0.5]), cfg).tolist() == [0, cfg.denoise.noise_bins - 1]


# -- noise estimation and SDEdit -----------------------------------------------------------------
def test_estimate_sigma_inside_the_head_ignores_the_zero_background():
    rng = np.random.default_rng(0)
    volume = np.zeros((64, 64, 16), np.float32)
    head = np.zeros_like(volume, bool)
    head[16:48, 16:48] = True
    volume[head] = 0.6 + 0.05 * rng.standard_normal(head.sum())
    assert estimate_sigma(volume, head) == pytest.approx(0.05, rel=0.1)


def test_sdedit_starts_where_the_forward_noise_matches_the_scan():
    from medidiff.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    t5, t10 = sdedit_timestep(schedule, 0.05), sdedit_timestep(schedule, 0.10)
    ab = float(schedule.alphas_cumprod[t10])
    assert math.sqrt((1 - ab) / ab) == pytest.approx(0.2, rel=0.05)
    assert 1 <= t5 < t10 and sdedit_timestep(schedule, 0.0) == 1


def test_zero_shot_sdedit_with_an_anomaly_model(tiny_model, example_data, tmp_path):
    denoiser = Denoiser.load(tiny_model, device="cpu", steps=2)
    results = {k: denoiser.predict_file(_copy(example_data, k)) for k in ("noisy05", "noisy10")}
    assert results["noisy05"].info["zero_shot"]
    assert results["noisy05"].info["t_start"] < results["noisy10"].info["t_start"]
    scan = _copy(example_data, "noisy10")
    out = tmp_path / "out"
    code, _, err = run_cli("denoise", "--model", str(tiny_model), "--out", str(out), "--steps",
                           "1", str(scan))
    assert code == 0, err
    written = nib.load(out / f"{scan.name[:-7]}_denoised.nii.gz")
    assert written.shape == nib.load(scan).shape


# -- outputs ---------------------------------------------------------------------------------------
def test_denoise_cli_writes_mean_and_std_in_the_input_space(denoise_model, example_data, tmp_path):
    scan = _copy(example_data, "noisy10")
    before = _digest(scan)
    out = tmp_path / "out"
    code, _, err = run_cli("denoise", "--model", str(denoise_model), "--out", str(out),
                           "--samples", "2", "--steps", "2", str(scan))
    assert code == 0, err
    case, source = scan.name[:-7], nib.load(scan)
    mean = nib.load(out / f"{case}_denoised.nii.gz")
    std = nib.load(out / f"{case}_denoised_std.nii.gz")
    assert mean.shape == std.shape == source.shape
    np.testing.assert_allclose(mean.affine, source.affine, atol=1e-5)
    assert mean.get_data_dtype() == np.float32
    values = np.asarray(mean.dataobj)
    assert np.isfinite(values).all() and 0.2 < values.max() / np.asarray(source.dataobj).max() < 2
    assert np.asarray(std.dataobj).max() > 0
    assert (out / f"{case}.png").read_bytes()[:4] == b"\x89PNG"
    assert _digest(scan) == before  # inputs never change


def test_super_resolve_cli_updates_the_affine_for_the_new_spacing(superres_model, example_data,
                                                                  tmp_path):
    scan, clean = _copy(example_data, "lowres4"), nib.load(_copy(example_data, "clean"))
    out = tmp_path / "out"
    code, _, err = run_cli("super-resolve", "--model", str(superres_model), "--out", str(out),
                           str(scan))
    assert code == 0, err
    low = nib.load(scan)  # 8 mm in-plane; the model's target is 4 mm: x2
    sr = nib.load(out / f"{scan.name[:-7]}_sr.nii.gz")
    assert sr.shape == (low.shape[0] * 2, low.shape[1] * 2, low.shape[2])
    np.testing.assert_allclose(sr.header.get_zooms(), (4.0, 4.0, 2.0), atol=1e-5)
    # the 4 mm grid is the clean 2 mm scan averaged 2-fold: same centres as degrade.downsample's
    np.testing.assert_allclose(sr.affine, fine_affine(clean.affine, (0.5, 0.5, 1)), atol=1e-4)
    assert np.isfinite(np.asarray(sr.dataobj)).all()


def _block_mismatch(image: np.ndarray, low: torch.Tensor) -> float:
    """How far the 4x4 block averages of ``image`` are from ``low``, relative to its range."""
    again = degrade.downsample(torch.from_numpy(image)[None, None], 4, dims=(0, 1))
    return float((again - low).abs().max() / low.max())


def test_super_resolve_scale_option_samples_and_data_consistency(superres_model, example_data):
    scan = _copy(example_data, "lowres4")
    low = torch.from_numpy(np.asarray(nib.load(scan).dataobj, np.float32))[None, None]
    resolver = SuperResolver.load(superres_model, device="cpu", scale=4, samples=2, steps=2)
    result = resolver.predict_file(scan)
    np.testing.assert_allclose(np.linalg.norm(result.affine[:3, :3], axis=0), (2, 2, 2), atol=1e-5)
    assert result.std is not None and result.std.shape == result.image.shape
    assert result.info["factors"] == [4, 4, 1] and result.info["trained_scale"] == 4
    # consistency (the default): every 4x4 block of the result averages to the input voxel,
    # unclipped, in the scan's units; without it the result does not
    assert result.info["consistency"] is True and _block_mismatch(result.image, low) < 1e-4
    free = SuperResolver.load(superres_model, device="cpu", scale=4, sampler="x0", steps=1,
                              consistency=False).predict_file(scan)
    assert free.info["consistency"] is False and _block_mismatch(free.image, low) > 1e-3


def test_3d_denoiser_runs_with_sliding_windows(tmp_path_factory, example_data):
    model = _train(tmp_path_factory, example_data, "denoise", "cpu-tiny-3d")
    scan = _copy(example_data, "noisy05")
    result = Denoiser.load(model, device="cpu").predict_file(scan)
    assert result.image.shape == nib.load(scan).shape
    assert max(result.after.shape) > 32  # larger than the 32^3 training patches
    np.testing.assert_allclose(result.affine, nib.load(scan).affine, atol=1e-5)


def test_3d_super_resolution_of_thick_slices(tmp_path_factory, example_data, tmp_path):
    model = _train(tmp_path_factory, example_data, "superres", "cpu-tiny-3d")
    clean = nib.load(_copy(example_data, "clean"))
    thick = degrade.downsample(torch.from_numpy(np.asarray(clean.dataobj, np.float32))[None, None],
                               6, dims=(2,))[0, 0].numpy()
    affine = fine_affine(clean.affine, (1, 1, 1 / 6))  # 12 mm slices
    result = SuperResolver.load(model, device="cpu").predict_array(thick, affine)
    np.testing.assert_allclose(np.linalg.norm(result.affine[:3, :3], axis=0), (6, 6, 6), atol=1e-4)
    assert result.info["factors"] == [1, 1, 2]
    assert result.image.shape[2] == thick.shape[2] * 2


# -- bad input -------------------------------------------------------------------------------------
def _one_line_error(code: int, err: str, text: str) -> None:
    assert code == 2
    assert text in err and "Traceback" not in err


def test_nan_scan_is_refused_in_one_line(denoise_model, tmp_path):
    data = np.ones((20, 20, 8), np.float32)
    data[3, 3, 3] = np.nan
    scan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), scan)
    code, _, err = run_cli("denoise", "--model", str(denoise_model), "--out", str(tmp_path / "o"),
                           "--no-tracking", str(scan))
    _one_line_error(code, err, "NaN")
    assert not list((tmp_path / "o").glob("nan*"))


def test_scan_thinner_than_the_context_is_refused(denoise_model, tmp_path):
    scan = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 2), np.float32),
                             np.diag([2, 2, 2, 1.0])), scan)
    with pytest.raises(InputError, match="needs at least 3"):
        Denoiser.load(denoise_model, device="cpu").predict_file(scan)


def test_spacing_already_at_target_is_refused(superres_model, example_data, tmp_path):
    scan = _copy(example_data, "lowres2")  # 4 mm in-plane: the model's target
    code, _, err = run_cli("super-resolve", "--model", str(superres_model), "--out",
                           str(tmp_path / "o"), "--scale", "2", "--no-tracking", str(scan))
    _one_line_error(code, err, "nothing to super-resolve")


def test_model_of_another_task_is_refused(denoise_model, superres_model, example_data, tmp_path):
    scan = str(_copy(example_data, "lowres4"))
    code, _, err = run_cli("super-resolve", "--model", str(denoise_model), "--out",
                           str(tmp_path / "a"), "--no-tracking", scan)
    _one_line_error(code, err, "holds a 'denoise' model")
    with pytest.raises(ModelFolderError, match="'superres' model"):
        Denoiser.load(superres_model, device="cpu")


def test_super_resolution_refuses_a_grid_beyond_the_voxel_limit(superres_model, tmp_path):
    scan = tmp_path / "coarse.nii.gz"
    image = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([8.0, 8.0, 8.0, 1.0])), scan)
    code, _, err = run_cli("super-resolve", "--model", str(superres_model), "--out",
                           str(tmp_path / "out"), "--scale", "500", str(scan))
    assert code == 2 and "the limit is" in err.splitlines()[0] and "Traceback" not in err, err
    assert not (tmp_path / "out" / "coarse_sr.nii.gz").exists()


def test_super_resolution_keeps_the_input_axis_order(superres_model, example_data):
    scan = nib.load(_copy(example_data, "lowres4"))
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = scan.shape[0] - 1  # voxel i of the flipped array is voxel n - 1 - i
    # LAS instead of RAS, the same voxels in the same places (nibabel's slicer[::-1] keeps the
    # old origin, so it would mirror the scan in world space)
    flipped = nib.Nifti1Image(np.asarray(scan.dataobj)[::-1], scan.affine @ flip)
    resolver = SuperResolver.load(superres_model, device="cpu", sampler="x0", steps=1)
    ras = resolver.predict_array(np.asarray(scan.dataobj), scan.affine)
    las = resolver.predict_array(np.asarray(flipped.dataobj), flipped.affine)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    np.testing.assert_allclose(las.image[::-1], ras.image, atol=1e-4)
    last = las.image.shape[0] - 1
    np.testing.assert_allclose(las.affine @ [last, 0, 0, 1], ras.affine @ [0, 0, 0, 1], atol=1e-4)


# -- benchmark baselines ------------------------------------------------------------------------
def _weighted(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():  # the last layer starts at zero: give it weights
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_regression_loss_keeps_the_diffusion_losss_batch_stream():
    from benchmarks._regression import RegressionLoss
    from medidiff.diffusion.schedule import NoiseSchedule
    from medidiff.training.loss import loss_from_config

    cfg = _config("superres")
    task = get_task("superres")
    net = _weighted(build_network(cfg, task))
    inputs = task.training_inputs({"image": _batch(1)}, cfg, torch.Generator().manual_seed(1))
    schedule = NoiseSchedule(**cfg.diffusion.model_dump())
    states = []
    for loss in (loss_from_config(cfg), RegressionLoss(cfg.trained_timesteps())):
        generator = torch.Generator().manual_seed(2)
        value = loss(net, inputs, schedule, generator)
        assert torch.isfinite(value) and value > 0
        states.append(generator.get_state())
    assert torch.equal(*states)  # the same pairs follow, step after step


def test_one_pass_network_ignores_the_samplers_noise_and_timestep():
    from benchmarks._regression import OnePass

    net = OnePass(_weighted(build_network(_config("superres"), get_task("superres"))))
    condition = torch.rand(2, 1, 32, 32)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        first = net(torch.cat([torch.randn(2, 1, 32, 32), condition], 1),
                    timesteps=torch.tensor([999, 999]), class_labels=labels)
        second = net(torch.cat([torch.randn(2, 1, 32, 32), condition], 1),
                     timesteps=torch.tensor([3, 500]), class_labels=labels)
    torch.testing.assert_close(first, second)


def test_regression_baseline_trains_to_its_step_budget_and_runs_in_one_pass(example_data,
                                                                             tmp_path):
    from benchmarks._regression import as_regression, train_regression

    config = REPO / "configs" / "denoise" / "cpu-tiny.yaml"
    record = train_regression(config, example_data, tmp_path / "reg", steps=2, seconds=600)
    assert record["steps"] == 2 and (tmp_path / "reg" / "model.yaml").is_file()
    denoiser = as_regression(Denoiser.load(tmp_path / "reg", "cpu", sampler="x0", steps=1))
    scan = _copy(example_data, "noisy10")
    result = denoiser.predict_file(scan)
    assert result.image.shape == nib.load(scan).shape
    assert result.info["nfe_per_slice"] == 1


def test_bm4d_baseline_is_left_out_without_the_optional_package(monkeypatch):
    import sys

    from benchmarks import enhance

    monkeypatch.setitem(sys.modules, "bm4d", None)  # as if not installed
    assert enhance.bm4d_denoiser() is None
    noisy = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32)
    assert set(enhance.classical_denoisers(noisy)) == {"nlm", "tv"}
