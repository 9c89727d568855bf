"""The model folder: weights (safetensors), ``model.yaml`` and a short model card.

``model.yaml`` holds everything inference needs: the resolved config (network, schedule, task,
preprocessing), the calibration, the training-data fingerprint and the weights' hash. It is read
with YAML's safe loader and validated; weights are loaded without unpickling and checked against
the recorded hash.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import medidiff
from medidiff.config import Config, from_dict
from medidiff.errors import ConfigError, ModelFolderError
from medidiff.io.write import atomic_write_text
from medidiff.models.checkpoint import load_weights, save_weights
from medidiff.models.unet import build_unet

WEIGHTS = "weights.safetensors"
MODEL_YAML = "model.yaml"
MODEL_CARD = "model_card.md"
MODEL_FORMAT = "medidiff-model/1"  # what save_model_folder writes and read_model_yaml reads


@dataclass
class LoadedModel:
    """A model folder loaded for inference."""

    folder: Path
    config: Config
    net: torch.nn.Module
    calibration: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str | None = None  # checked against the weights file on loading

    @property
    def task(self) -> str:
        return self.config.task


def build_network(cfg: Config, task: Any) -> torch.nn.Module:
    """The DiffusionModelUNet a config describes, with the task's extra channels.

    ``task`` is the task object of ``cfg.task`` (``medidiff.tasks.registry.get_task``): models
    import no task, the caller hands it over. It gives ``target_channels(cfg)``,
    ``condition_channels(cfg)`` and ``num_class_embeds(cfg)``.
    """
    target = task.target_channels(cfg)
    m = cfg.model
    return build_unet(
        spatial_dims=cfg.data.spatial_dims,
        in_channels=target + task.condition_channels(cfg),
        out_channels=target,
        channels=tuple(m.channels),
        attention_levels=tuple(m.attention_levels),
        num_res_blocks=m.num_res_blocks,
        num_head_channels=m.num_head_channels,
        norm_num_groups=m.norm_num_groups,
        num_class_embeds=task.num_class_embeds(cfg),
    )


def save_model_folder(folder: Path, cfg: Config, state_dict: dict, info: dict[str, Any],
                      calibration: dict[str, Any] | None = None) -> Path:
    """Write weights, model.yaml and the model card atomically (weights first)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = save_weights(state_dict, folder / WEIGHTS)
    meta = {
        "format": MODEL_FORMAT,
        "medidiff_version": medidiff.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "task": cfg.task,
        "weights": {"file": WEIGHTS, "sha256": digest},
        "calibration": calibration or {},
        "info": info,
        "config": cfg.to_dict(),
    }
    atomic_write_text(folder / MODEL_YAML, yaml.safe_dump(meta, sort_keys=False))
    atomic_write_text(folder / MODEL_CARD, model_card(cfg, meta))
    return folder


def update_calibration(folder: Path, calibration: dict[str, Any]) -> None:
    """Store calibrated thresholds in model.yaml (atomically)."""
    meta = read_model_yaml(folder)
    meta["calibration"] = calibration
    atomic_write_text(folder / MODEL_YAML, yaml.safe_dump(meta, sort_keys=False))


def read_model_yaml(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MODEL_YAML
    if not folder.is_dir():
        raise ModelFolderError(folder, "is not a model folder (does not exist)")
    if not path.is_file():
        raise ModelFolderError(folder, f"is not a model folder (no {MODEL_YAML})")
    try:
        meta = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ModelFolderError(path, "is not valid YAML") from None
    if isinstance(meta, dict) and meta.get("format") != MODEL_FORMAT:
        if "format" not in meta:
            raise ModelFolderError(path, f"has no 'format' key, so it was not written by "
                                         f"medidiff; this medidiff reads {MODEL_FORMAT!r}")
        found = repr(meta["format"])
        found = found if len(found) <= 60 else found[:57] + "..."
        raise ModelFolderError(path, f"was written by a newer or foreign tool (format {found}); "
                                     f"this medidiff reads {MODEL_FORMAT!r}")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ModelFolderError(path, "has no 'config' mapping")
    return meta


class _Strict(BaseModel):
    # strict: the raw values are used as they are, so "0.5" must not pass for a number
    model_config = ConfigDict(extra="allow", strict=True)


class _Weights(_Strict):
    file: str = WEIGHTS
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")


class _CalibrationEntry(_Strict):
    settings: dict[str, Any]
    voxel_threshold: float | None = None
    scan_threshold: float | None = None
    residual_stats: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
                                       description="a file name inside the model folder")


class _Calibration(_Strict):
    entries: list[_CalibrationEntry] = Field(default_factory=list)
    ood: dict[str, Annotated[list[float], Field(min_length=2, max_length=2)]] = Field(
        default_factory=dict)


class _Meta(_Strict):
    """What inference reads from model.yaml besides the config (validated by ``from_dict``)."""

    weights: _Weights
    calibration: _Calibration | None = None
    info: dict[str, Any] | None = None


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a model.yaml whose weights, calibration or info entries have the wrong shape."""
    try:
        _Meta.model_validate(meta)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ModelFolderError(path, f"key '{key}': {first['msg']}") from None


def _check_fit(path: Path, cfg: Config, task: Any, state: dict[str, torch.Tensor]) -> None:
    """The weights must have the network's exact shapes, checked on the meta device first so
    that a model.yaml asking for a huge network cannot allocate more than its weights hold."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_network(cfg, task).state_dict().items()}
    if shapes != {k: tuple(v.shape) for k, v in state.items()}:
        raise ModelFolderError(path, "weights do not fit the network described in model.yaml")


def _config_of(folder: Path, meta: dict[str, Any]) -> Config:
    try:
        return from_dict(meta["config"], source=str(folder / MODEL_YAML))
    except ConfigError as err:
        raise ModelFolderError(folder / MODEL_YAML, str(err)) from None


def read_model_config(folder: str | Path) -> Config:
    """The validated config of a model folder's model.yaml (its ``task`` names the task)."""
    folder = Path(folder)
    return _config_of(folder, read_model_yaml(folder))


def load_model(folder: str | Path, task: Any, device: str = "cpu") -> LoadedModel:
    """Load a model folder for inference; refuse one of another task or with tampered weights.

    ``task`` is the task object the caller expects (``medidiff.tasks.registry.load_model``
    finds it from the folder); the folder's ``task`` must be ``task.name``.
    """
    folder = Path(folder)
    meta = read_model_yaml(folder)
    cfg = _config_of(folder, meta)
    if cfg.task != task.name:
        raise ModelFolderError(folder, f"holds a '{cfg.task}' model, not a '{task.name}' model")
    _check_meta(folder / MODEL_YAML, meta)
    weights = meta["weights"]
    name = str(weights.get("file", WEIGHTS))
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise ModelFolderError(folder / MODEL_YAML, f"weights path '{name}' leaves the model folder")
    state = load_weights(path, expected_sha256=weights["sha256"])
    _check_fit(path, cfg, task, state)
    net = build_network(cfg, task)
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise ModelFolderError(path, "weights do not fit the network described in model.yaml") from None
    net.to(device).eval()
    return LoadedModel(folder, cfg, net, dict(meta.get("calibration") or {}),
                       dict(meta.get("info") or {}), weights_sha256=weights["sha256"].lower())


def preprocessing_summary(cfg: Config) -> str:
    p = cfg.preprocess
    if not p.enabled:
        return "none (scans already aligned)"
    steps = ["N4 bias correction" if p.bias_correction == "n4" else "",
             f"{p.registration} registration to {p.template}" if p.registration != "none" else "",
             f"template brain mask (eroded {p.mask_erosion_mm:g} mm)"
             if p.skull_strip == "template" else "",
             "deepbet brain extraction" if p.skull_strip == "deepbet" else ""]
    return ", ".join(s for s in steps if s)


def intensity_summary(cfg: Config) -> str:
    if cfg.data.intensity_percentiles is None:
        return (f"intensities normalised by the brain's {cfg.preprocess.normalise}, clipped at "
                f"{cfg.data.intensity_ceiling:g}")
    return f"percentile scaling {list(cfg.data.intensity_percentiles)} to [0, 1]"


def model_card(cfg: Config, meta: dict[str, Any]) -> str:
    info = meta.get("info", {})
    lines = [
        f"# medidiff model: {cfg.task}",
        "",
        f"- created: {meta['created']} with medidiff {meta['medidiff_version']}",
        f"- task: {cfg.task}; {cfg.data.spatial_dims}D DiffusionModelUNet "
        f"(channels {cfg.model.channels}), {info.get('parameters', '?')} parameters",
        f"- trained {info.get('steps', '?')} steps, batch {cfg.train.batch_size}, "
        f"final loss {info.get('final_loss', '?')}",
        f"- training data fingerprint: {info.get('data_fingerprint', '?')} "
        f"({info.get('training_scans', '?')} scans)",
        f"- preprocessing: {preprocessing_summary(cfg)}, RAS, spacing {cfg.data.spacing} mm, "
        f"{intensity_summary(cfg)}, grid {cfg.data.size}",
        "",
        "Intended use: research. Not a medical device; outputs need expert review.",
        "",
    ]
    return "\n".join(lines)
