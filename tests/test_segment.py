"""Diffusion segmentation: label codes, ensemble fusion, uncertainty, training, outputs, bad input."""

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medidiff.config import load_config
from medidiff.errors import InputError, ModelFolderError
from medidiff.tasks.segment.task import (
    SegmentTask,
    code_channels,
    decode_labels,
    decode_probabilities,
    encode_labels,
    entropy,
    fuse,
)
from tests.helpers import REPO, run_cli

TINY = REPO / "configs" / "segment" / "cpu-tiny.yaml"
TINY3D = REPO / "configs" / "segment" / "cpu-tiny-3d.yaml"


@pytest.fixture(scope="session")
def segment_model(tmp_path_factory, example_data) -> Path:
    """The cpu-tiny segmentation model trained on the example data's tissue labels."""
    from medidiff.tasks.registry import get_task
    from medidiff.training.trainer import run_training

    out = tmp_path_factory.mktemp("models") / "segment-tiny"
    run_training(load_config(TINY), example_data, out, task=get_task("segment"))
    return out


def _test_scan(example_data: Path) -> Path:
    return sorted((example_data / "test" / "images").glob("*.nii.gz"))[0]


# -- label codes --------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["onehot", "bits"])
@pytest.mark.parametrize("num_classes", [2, 3, 4, 5, 8])
def test_label_code_round_trip(encoding, num_classes):
    labels = torch.randint(num_classes, (3, 1, 7, 9))
    code = encode_labels(labels, num_classes, encoding)
    assert code.shape == (3, code_channels(num_classes, encoding), 7, 9)
    assert set(code.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(decode_labels(code, num_classes, encoding), labels)
    probs = decode_probabilities(code, num_classes, encoding)
    assert torch.equal(probs, torch.nn.functional.one_hot(labels[:, 0], num_classes)
                       .movedim(-1, 1).float())


def test_code_channels_one_hot_and_analog_bits():
    assert code_channels(4, "onehot") == 4
    assert [code_channels(k, "bits") for k in (2, 3, 4, 5, 8, 9)] == [1, 2, 2, 3, 3, 4]


def test_noisy_codes_decode_to_probabilities_that_sum_to_one():
    code = torch.randn(2, 2, 5, 5) * 2
    for encoding, k in (("onehot", 2), ("bits", 3)):
        probs = decode_probabilities(code, k, encoding)
        assert probs.shape == (2, k, 5, 5) and probs.min() >= 0
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 5, 5))
    # analog bits with 3 classes: the code of the unused class 3 (both bits on) is dropped
    both_on = torch.ones(1, 2, 1, 1)
    probs = decode_probabilities(both_on * 0.5, 3, "bits")
    assert probs.argmax(dim=1).item() in (1, 2)


# -- ensembles and uncertainty ------------------------------------------------------------------
def test_mean_fusion_averages_soft_maps_then_argmax():
    # three samples over two classes at two voxels; the mean decides where votes would tie
    probs = torch.tensor([[[0.9, 0.4]], [[0.2, 0.4]], [[0.3, 0.45]]])  # (N, 1, 2): class-1 prob
    probs = torch.cat([1 - probs, probs], dim=1)  # (N, 2, 2)
    fused = fuse(probs, "mean")
    torch.testing.assert_close(fused[1], torch.tensor([1.4 / 3, 1.25 / 3]))
    assert fused.argmax(dim=0).tolist() == [0, 0]


def test_vote_fusion_takes_the_majority_of_sample_labels():
    probs = torch.tensor([[0.9, 0.1], [0.45, 0.55], [0.4, 0.6]])[:, :, None]  # (N=3, K=2, 1)
    assert fuse(probs, "mean").argmax(dim=0).item() == 0  # mean 0.583 for class 0
    voted = fuse(probs, "vote")
    assert voted.argmax(dim=0).item() == 1  # two of three samples say class 1
    torch.testing.assert_close(voted.sum(dim=0), torch.ones(1))


def test_entropy_is_zero_when_certain_and_one_when_uniform():
    certain = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
    uniform = torch.full((4, 1), 0.25)
    assert entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    assert entropy(uniform).item() == pytest.approx(1.0, abs=1e-6)
    random = torch.softmax(torch.randn(4, 50), dim=0)
    values = entropy(random)
    assert values.shape == (50,) and values.min() >= 0 and values.max() <= 1


# -- training -----------------------------------------------------------------------------------
def test_training_targets_encode_labels_and_condition_on_the_image():
    cfg = load_config(TINY)
    batch = {"image": torch.rand(2, 1, 8, 8), "label": torch.randint(4, (2, 1, 8, 8)).float()}
    inputs = SegmentTask().training_inputs(batch, cfg, torch.Generator().manual_seed(0))
    assert inputs.target.shape == (2, 4, 8, 8)
    assert torch.equal(decode_labels(inputs.target, 4), batch["label"].long())
    torch.testing.assert_close(inputs.condition, batch["image"] * 2 - 1)


def test_training_refuses_labels_beyond_num_classes_and_wrong_channels():
    cfg = load_config(TINY)
    task, generator = SegmentTask(), torch.Generator()
    batch = {"image": torch.rand(1, 1, 4, 4), "label": torch.full((1, 1, 4, 4), 5.0)}
    with pytest.raises(InputError, match="num_classes"):
        task.training_inputs(batch, cfg, generator)
    batch = {"image": torch.rand(1, 2, 4, 4), "label": torch.zeros(1, 1, 4, 4)}
    with pytest.raises(InputError, match="2 channels"):
        task.training_inputs(batch, cfg, generator)


def test_tiny_2d_training_writes_a_segment_model(segment_model):
    meta = yaml.safe_load((segment_model / "model.yaml").read_text())
    assert meta["task"] == "segment" and meta["info"]["steps"] == 20
    from medidiff.tasks.registry import load_model

    net = load_model(segment_model, task="segment").net
    assert net.conv_in.conv.in_channels == 4 + 1 and net.out[-1].conv.out_channels == 4


def test_tiny_3d_training_and_segmentation_end_to_end(tmp_path, example_data):
    from medidiff.api import Segmenter
    from medidiff.tasks.registry import get_task
    from medidiff.training.trainer import run_training

    run_training(load_config(TINY3D), example_data, tmp_path / "m3d", task=get_task("segment"))
    scan = _test_scan(example_data)
    result = Segmenter.load(tmp_path / "m3d", device="cpu").predict_file(scan)
    source = nib.load(scan)
    assert result.labels.shape == source.shape and result.labels.dtype == np.uint8
    assert result.labels.max() < 4
    assert result.grid.samples.shape[:2] == (2, 4)  # 2 samples, 4 classes (2 analog bits)
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)


# -- inference: outputs and their geometry ------------------------------------------------------
def test_segment_cli_writes_labels_uncertainty_and_probabilities(segment_model, example_data,
                                                                  tmp_path):
    scan = _test_scan(example_data)
    case = scan.name[:-7]
    out = tmp_path / "seg"
    code, _, err = run_cli("segment", "--model", str(segment_model), "--out", str(out),
                           str(scan), "--samples", "2", "--steps", "2", "--save-prob",
                           "--labels", str(example_data / "test" / "labels"))
    assert code == 0, err
    source = nib.load(scan)
    labels = nib.load(out / f"{case}_seg.nii.gz")
    uncertainty = nib.load(out / f"{case}_seg_uncertainty.nii.gz")
    probs = nib.load(out / f"{case}_seg_prob.nii.gz")
    assert labels.shape == uncertainty.shape == source.shape
    assert probs.shape == (*source.shape, 4)
    for image in (labels, uncertainty, probs):
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    assert labels.get_data_dtype() == np.uint8 and uncertainty.get_data_dtype() == np.float32
    values = np.asarray(labels.dataobj)
    assert values.max() < 4 and values[np.asarray(source.dataobj) == 0].mean() < 0.5
    spread = np.asarray(uncertainty.dataobj)
    assert spread.min() >= 0 and spread.max() <= 1 and spread.max() > 0
    np.testing.assert_allclose(np.asarray(probs.dataobj).sum(axis=-1), 1.0, atol=1e-4)
    assert (out / f"{case}.png").read_bytes()[:4] == b"\x89PNG"
    row = next(csv.DictReader((out / "segment.csv").open()))
    assert row["case"] == case and 0 <= float(row["dice_mean"]) <= 1
    assert {"dice_1", "dice_2", "dice_3", "hd95_mean", "uncertainty_auroc"} <= set(row)


def test_array_api_and_linear_resampling_keep_the_input_grid(segment_model, example_data):
    from medidiff.api import Segmenter

    scan = _test_scan(example_data)
    source = nib.load(scan)
    segmenter = Segmenter.load(segment_model, device="cpu", samples=1, steps=1,
                               resample="linear")
    result = segmenter.predict_array(np.asarray(source.dataobj), source.affine)
    assert result.labels.shape == source.shape and result.probabilities.shape == (4, *source.shape)
    np.testing.assert_array_equal(result.labels, result.probabilities.argmax(axis=0))
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1


# -- bad input ----------------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_model_folder_of_another_task_is_refused(segment_model, example_data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(segment_model, other)
    meta = yaml.safe_load((other / "model.yaml").read_text())
    meta["config"]["task"] = meta["task"] = "anomaly"
    (other / "model.yaml").write_text(yaml.safe_dump(meta))
    code, _, err = run_cli("segment", "--model", str(other), "--out", str(tmp_path / "o"),
                           str(_test_scan(example_data)))
    assert code == 2
    assert "'anomaly' model, not a 'segment' model" in _one_error_line(err)
    with pytest.raises(ModelFolderError):
        from medidiff.api import Segmenter

        Segmenter.load(other)


def test_image_with_other_channel_count_is_refused(segment_model, example_data, tmp_path):
    source = nib.load(_test_scan(example_data))
    two = np.stack([np.asarray(source.dataobj)] * 2, axis=-1)
    path = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(two.astype(np.float32), source.affine), path)
    out = tmp_path / "o"
    code, _, err = run_cli("segment", "--model", str(segment_model), "--out", str(out), str(path))
    assert code == 2 and "two.nii.gz" in _one_error_line(err)
    assert not list(out.glob("two_seg*"))


def test_reference_labels_of_another_shape_are_refused(segment_model, example_data, tmp_path):
    scan = _test_scan(example_data)
    source = nib.load(scan)
    labels = tmp_path / "labels"
    labels.mkdir()
    wrong = np.zeros(tuple(s - 2 for s in source.shape), np.uint8)
    wrong[2:5, 2:5, 2:5] = 1
    nib.save(nib.Nifti1Image(wrong, source.affine), labels / scan.name)
    code, _, err = run_cli("segment", "--model", str(segment_model), "--out", str(tmp_path / "o"),
                           str(scan), "--labels", str(labels), "--samples", "1", "--steps", "1")
    assert code == 2 and "its image has shape" in _one_error_line(err)


# -- the supervised baseline --------------------------------------------------------------------
class _IntensityNet(torch.nn.Module):
    """Logits from intensity: class c is most likely near c / 3; an all-zero input says class 2,
    so a slice the net is run on never comes back as certain background."""

    strides = (1, 2)

    def forward(self, x):
        centres = torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]).reshape(1, 4, 1, 1)
        logits = -40.0 * (x[:, :1] - centres) ** 2
        logits[:, 2] += 50.0 * (x[:, 0] == 0)
        return logits


def _baseline(net):
    from types import SimpleNamespace

    from medidiff.tasks.segment.baselines import UNetSegmenter

    cfg = load_config(TINY)
    segmenter = SimpleNamespace(cfg=cfg, settings=SimpleNamespace(batch_size=4),
                                device=torch.device("cpu"))
    return UNetSegmenter(net, segmenter)


def test_unet_baseline_runs_only_on_foreground_slices_as_the_diffusion_model():
    volume = torch.zeros(1, 48, 56, 10)
    volume[:, 8:40, 8:48, 4:6] = torch.linspace(0.25, 1.0, 40)[:, None]  # slices 4, 5: a head
    grid = _baseline(_IntensityNet()).segment_grid(volume)
    assert grid.samples.shape == (1, 4, 48, 56, 10)
    for empty in (0, 1, 8, 9):  # no foreground, never run: background with certainty
        assert not grid.labels[..., empty].any() and not grid.uncertainty[..., empty].any()
    assert set(np.unique(grid.labels[8:40, 8:48, 4])) == {1, 2, 3}
    assert (grid.labels[:8, :, 4] == 2).all()  # run slices get the network's own answer


def test_unet_entropy_uncertainty_is_in_unit_interval_and_higher_where_wrong():
    from medidiff.metrics import uncertainty_error_auroc

    volume = torch.zeros(1, 48, 56, 3)
    volume[:, 4:44, 4:52, :] = torch.linspace(0.05, 1.0, 48)[:, None]
    grid = _baseline(_IntensityNet()).segment_grid(volume)
    assert 0 <= grid.uncertainty.min() and grid.uncertainty.max() <= 1
    intensity = volume[0].numpy()
    # the reference's class boundaries sit a little off the network's (1/6, 1/2, 5/6)
    reference = np.digitize(intensity, [0.2, 0.45, 0.8]) * (intensity > 0)
    wrong = grid.labels != reference
    inside = reference > 0
    assert wrong[inside].any() and (~wrong[inside]).any()
    assert grid.uncertainty[wrong & inside].mean() > 2 * grid.uncertainty[~wrong & inside].mean()
    assert uncertainty_error_auroc(grid.uncertainty, wrong, mask=inside) > 0.8


def test_deep_supervision_loss_weights_heads_by_halves():
    from monai.losses import DiceCELoss

    from medidiff.tasks.segment.baselines import DeepSupervisionLoss

    labels = torch.randint(4, (2, 1, 8, 8)).float()
    heads = torch.randn(2, 3, 4, 8, 8)
    plain = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * plain(heads[:, i], labels) for i, w in enumerate([4 / 7, 2 / 7, 1 / 7]))
    loss = DeepSupervisionLoss()
    torch.testing.assert_close(loss(heads, labels), expected)
    torch.testing.assert_close(loss(heads[:, 0], labels), plain(heads[:, 0], labels))


def test_unet_training_logs_its_loss_and_snapshots_by_cpu_time():
    from medidiff.tasks.segment.baselines import build_unet, train_unet

    cfg = load_config(TINY)
    image = torch.rand(6, 1, 48, 56)
    labels = torch.bucketize(image, torch.tensor([0.25, 0.5, 0.75])).float()
    dataset = torch.utils.data.StackDataset(image=image, label=labels)
    dataset.data = {"image": image, "label": labels}  # as SliceDataset holds its slices
    net = build_unet(cfg, filters=(8, 16, 32), deep_supervision=1)
    first = net(image[:1])  # training mode: the full-resolution output and one head
    assert first.shape == (1, 2, 4, 48, 56)
    net, log = train_unet(cfg, dataset, max_cpu_seconds=3.0, window_seconds=0.75,
                          snapshot_at=(1.0,), net=net)
    assert log.stopped in ("converged", "time") and len(log.curve) >= 2
    assert log.curve[-1]["loss"] < log.curve[0]["loss"]
    times = [s["cpu_seconds"] for s in log.snapshots]
    assert len(times) == 2 and 1.0 <= times[0] < times[1]
    assert not net.training and net(image[:1]).shape == (1, 4, 48, 56)  # eval: one output
    described = log.describe()
    assert "state" not in described["snapshots"][0]


def test_unet_baseline_on_a_scan_matches_the_segmenter_output_space(segment_model, example_data):
    from medidiff.api import Segmenter
    from medidiff.tasks.segment.baselines import UNetSegmenter, build_unet

    segmenter = Segmenter.load(segment_model, device="cpu")
    scan = _test_scan(example_data)
    result = UNetSegmenter(build_unet(segmenter.cfg), segmenter).predict_file(scan)
    source = nib.load(scan)
    assert result.labels.shape == source.shape and result.labels.dtype == np.uint8
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    assert 0 <= result.uncertainty.min() and result.uncertainty.max() <= 1
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-4)


def test_otsu_baseline_labels_the_brain_by_increasing_intensity():
    from medidiff.tasks.segment.baselines import otsu_labels

    image = np.zeros((4, 4, 3), np.float32)
    image[1, 1], image[1, 2], image[2, 1], image[2, 2] = 0.2, 0.5, 0.8, 0.21
    labels = otsu_labels(image)
    assert (labels[image == 0] == 0).all()
    assert labels[1, 1, 0] == labels[2, 2, 0] < labels[1, 2, 0] < labels[2, 1, 0]
