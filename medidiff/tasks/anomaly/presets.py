"""Named scoring settings along the quality-per-NFE frontier (docs/benchmarks.md, "Fewer
network evaluations"): ``--preset fast|default|reference``.

``default`` is the model's own ``anomaly`` section; the others replace its sampler settings.
Each is calibrated on its own (``medidiff anomaly calibrate --preset NAME``): the map's scale
changes with the settings, so a calibration is stored per setting and never shared.
"""

from __future__ import annotations

from typing import Any

from medidiff.errors import ConfigError
from medidiff.names import SCORING_PRESETS

PRESETS: dict[str, dict[str, Any]] = {
    # one x0 jump from t=350, two draws: 2 network evaluations per slice (the best of the 1- and
    # 2-NFE settings on the demo model's frontier, docs/benchmarks.md)
    "fast": {"sampler": "x0", "noise_levels": [350], "steps": 1, "draws": 2},
    "default": {},
    # AnoDDPM's: the full DDPM chain from t=250, one draw (250 evaluations per slice)
    "reference": {"sampler": "ddpm", "noise_levels": [250], "steps": 250, "draws": 1},
}
assert tuple(PRESETS) == SCORING_PRESETS


def preset_settings(name: str | None) -> dict[str, Any]:
    """The anomaly-section overrides a preset stands for (``None``: none)."""
    if name is None:
        return {}
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r} (valid: {', '.join(PRESETS)})")
    return dict(PRESETS[name])
