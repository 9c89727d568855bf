import pytest

from medidiff import names
from medidiff.config import Config, apply_overrides, from_dict, load_config
from medidiff.errors import ConfigError, InputError
from tests.helpers import REPO


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_validates(path):
    cfg = load_config(path)
    assert cfg.task == path.parent.name


def test_presets_exist_for_every_task_and_size():
    for task in ("anomaly",):
        for preset in ("cpu-tiny", "cpu-small", "gpu-2d", "gpu-3d"):
            assert (REPO / "configs" / task / f"{preset}.yaml").is_file()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'"):
        from_dict({"train": {"stpes": 3}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.steps"):
        from_dict({"train": {"steps": "many"}})


def test_size_must_match_dimensions():
    with pytest.raises(ConfigError, match="data.size needs 3 numbers"):
        from_dict({"data": {"spatial_dims": 3, "size": [64, 64]}})


def test_overrides_parse_yaml_values():
    data = apply_overrides({}, ["train.steps=5", "model.channels=[8, 16]", "name=x"])
    cfg = from_dict(data)
    assert cfg.train.steps == 5 and cfg.model.channels == [8, 16] and cfg.name == "x"


def test_bare_off_turns_amp_off_from_yaml_and_overrides(tmp_path):
    # YAML reads a bare `off` as false; `amp: off` must still mean "off", not an error
    assert from_dict(apply_overrides({}, ["train.amp=off"])).train.amp == "off"
    path = tmp_path / "c.yaml"
    path.write_text("task: anomaly\ntrain:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    with pytest.raises(ConfigError, match="amp"):
        from_dict(apply_overrides({}, ["train.amp=on"]))


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.steps"])


def test_missing_and_invalid_yaml_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml: is not valid YAML"):
        load_config(bad)


def test_round_trip_through_dict():
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-small.yaml")
    assert from_dict(cfg.to_dict()) == cfg
    assert isinstance(cfg, Config)


def test_max_timestep_is_for_anomaly_models_scored_below_it():
    with pytest.raises(ConfigError, match="max_timestep is for anomaly"):
        load_config(REPO / "configs" / "denoise" / "cpu-tiny.yaml", ["train.max_timestep=500"])
    with pytest.raises(ConfigError, match="below train.max_timestep"):
        load_config(REPO / "configs" / "anomaly" / "cpu-tiny.yaml", ["train.max_timestep=200"])
    assert load_config(REPO / "configs" / "anomaly" / "cpu-tiny.yaml",
                       ["train.max_timestep=300"]).train.max_timestep == 300


def test_old_model_yaml_with_data_augment_still_loads():
    """``data.augment`` was read by nothing and is gone; configs that still hold it load."""
    old = Config().to_dict()
    old["data"]["augment"] = False
    cfg = from_dict(old)
    assert "augment" not in cfg.to_dict()["data"]
    assert cfg == Config()
    with pytest.raises(ConfigError, match="unknown key 'data.augmnet'"):
        from_dict({"data": {"augmnet": True}})


@pytest.mark.parametrize("key, valid", [
    ("task", names.TASK_NAMES), ("anomaly.sampler", names.SAMPLERS),
    ("denoise.sampler", names.SAMPLERS), ("superres.sampler", names.SAMPLERS),
    ("segment.sampler", names.SAMPLERS), ("segment.fusion", names.FUSIONS),
    ("segment.encoding", names.ENCODINGS), ("segment.resample", names.RESAMPLE_MODES),
    ("diffusion.schedule", names.NOISE_SCHEDULES),
    ("diffusion.prediction_type", names.PREDICTION_TYPES), ("train.amp", names.AMP_MODES),
    ("denoise.noise", names.NOISE_KINDS), ("train.loss_weighting", names.LOSS_WEIGHTINGS),
    ("preprocess.normalise", names.NORMALISATIONS),
])
def test_names_come_from_the_registry_and_errors_list_them(key, valid):
    for name in valid:
        from_dict(apply_overrides({}, [f"{key}={name}"]))
    with pytest.raises(ConfigError, match=key) as err:
        from_dict(apply_overrides({}, [f"{key}=nonsense"]))
    assert all(f"'{name}'" in str(err.value) for name in valid)


def test_sampler_registry_matches_the_samplers():
    from medidiff.diffusion import SAMPLERS

    assert tuple(SAMPLERS) == names.SAMPLERS


def test_intensities_kept_from_the_preprocessing_need_a_normalisation():
    raw = ["preprocess.registration=affine", "data.intensity_percentiles=null"]
    assert from_dict(apply_overrides({}, raw)).data.intensity_percentiles is None
    with pytest.raises(ConfigError, match="needs preprocess.normalise"):
        from_dict(apply_overrides({}, [*raw, "preprocess.normalise=none"]))
    with pytest.raises(ConfigError, match="cannot be null"):
        from_dict(apply_overrides({}, [*raw, "task=denoise"]))


def test_the_template_space_recipe_turns_registration_off_on_the_demo_preset():
    """README: scans already in template space train the cpu-small preset with registration,
    skull stripping and bias correction off; each scan's percentiles then scale it."""
    recipe = ["preprocess.registration=none", "preprocess.skull_strip=none",
              "preprocess.bias_correction=none"]
    cfg = load_config(REPO / "configs" / "anomaly" / "cpu-small.yaml", recipe)
    assert cfg.data.intensity_percentiles == (0.0, 99.5)
    assert not cfg.preprocess.enabled
