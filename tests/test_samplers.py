"""Samplers against an exact Gaussian oracle: data ~ N(MU, SD^2) per pixel, so the ideal network
E[eps | x_t] is known in closed form and a correct sampler must reproduce N(MU, SD^2).

Few-step samplers are only exact in the limit. What they give on this oracle from t=999 (std;
the mean is always 0.30), 20000 samples, linear / log-SNR spacing:

    steps        10            50            250
    ddpm     0.093/0.133   0.159/0.183   0.189/0.196   (ancestral: plug-in x0 under-disperses)
    ddim     0.097/0.157   0.174/0.191   0.195/0.199   (first order)
    dpmpp2m  0.100/0.199   0.188/0.201   0.200/0.200   (second order)

So each sampler is checked where it should be accurate (``from_noise``/``partial``), plus
convergence with steps, plus laws that hold exactly at any step count.
"""

from __future__ import annotations

import math

import pytest
import torch

from medidiff.diffusion import SAMPLERS, NoiseSchedule, get_sampler, nfe, timestep_schedule
from medidiff.diffusion import samplers as S
from medidiff.errors import ConfigError

MU, SD = 0.3, 0.2
SHAPE = (100, 1, 10, 20)  # 20000 scalars, fed as a batch of 2D images
T_PARTIAL = 250


class GaussianOracle:
    """The exact network for data ~ N(MU, SD^2), in the schedule's prediction type."""

    def __init__(self, schedule: NoiseSchedule, mu: float = MU, sd: float = SD):
        self.schedule, self.mu, self.sd = schedule, mu, sd
        self.calls = 0

    def x0_mean(self, x, t):
        ab = self.schedule.abar(t, x)
        return self.mu + ab.sqrt() * self.sd**2 * (x - ab.sqrt() * self.mu) / (
            ab * self.sd**2 + 1 - ab
        )

    def __call__(self, x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls += 1
        ab = self.schedule.abar(t, x)
        x0 = self.x0_mean(x, t)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        kind = self.schedule.prediction_type
        return {
            "epsilon": eps,
            "sample": x0,
            "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0,
        }[kind]

    def marginal(self, t, generator, dtype=torch.float32):
        """Exact samples of x_t: N(sqrt(ab) MU, ab SD^2 + 1 - ab)."""
        ab = float(self.schedule.alphas_cumprod[t])
        z = torch.randn(SHAPE, generator=generator, dtype=dtype)
        return math.sqrt(ab) * self.mu + math.sqrt(ab * self.sd**2 + 1 - ab) * z


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule()


def assert_matches_data(out, mean_tol=0.01, std_tol=0.02):
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean - MU) < mean_tol, f"mean {mean:.4f}, expected {MU}"
    assert abs(std - SD) < std_tol, f"std {std:.4f}, expected {SD}"


class SamplerOracleBase:
    """Checks every sampler must pass; a subclass names the sampler and its accurate settings."""

    name: str
    options: dict = {}
    stochastic: bool = False
    from_noise: tuple[int, str]  # (steps, spacing) accurate from t = 999
    partial: tuple[int, str]  # (steps, spacing) accurate from t = 250

    def run(self, schedule, x, timesteps, generator=None, **kw):
        model = kw.pop("model", None) or GaussianOracle(schedule)
        sampler = get_sampler(self.name)
        return sampler(model, x, timesteps, schedule, generator=generator, **self.options, **kw)

    def test_pure_noise_gives_data_distribution(self, schedule):
        steps, spacing = self.from_noise
        ts = timestep_schedule(999, steps, spacing=spacing, schedule=schedule)
        g = gen()
        out = self.run(schedule, GaussianOracle(schedule).marginal(999, g), ts, g)
        assert_matches_data(out)

    def test_partial_noise_gives_data_distribution(self, schedule):
        g = gen(1)
        x0 = MU + SD * torch.randn(SHAPE, generator=g)
        t = torch.full((SHAPE[0],), T_PARTIAL, dtype=torch.long)
        x = schedule.add_noise(x0, torch.randn(SHAPE, generator=g), t)
        steps, spacing = self.partial
        ts = timestep_schedule(T_PARTIAL, steps, spacing=spacing, schedule=schedule)
        assert_matches_data(self.run(schedule, x, ts, g))

    def test_mean_exact_and_std_error_shrinks_with_steps(self, schedule):
        errors = []
        for steps in (10, 50, 250):
            g = gen(2)
            out = self.run(
                schedule,
                GaussianOracle(schedule).marginal(999, g),
                timestep_schedule(999, steps),
                g,
            )
            assert abs(out.mean().item() - MU) < 0.01
            errors.append(abs(out.std().item() - SD))
        assert errors[0] > errors[1] > errors[2], errors
        assert errors[2] < 0.02, errors

    def test_strided_step_reaches_exact_marginal_when_x0_is_known(self, schedule):
        """Given the true eps, one step 500 -> 100 must land on q(x_100 | x0) for any sampler."""
        x0 = torch.full(SHAPE, MU, dtype=torch.float64)
        g = gen(3)
        t = torch.full((SHAPE[0],), 500, dtype=torch.long)
        x = schedule.add_noise(x0, torch.randn(SHAPE, generator=g, dtype=torch.float64), t)

        def true_eps(x_t, t):
            ab = schedule.abar(t, x_t)
            return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

        seen = {}
        self.run(
            schedule,
            x,
            [500, 100],
            g,
            model=true_eps,
            callback=lambda d: seen.setdefault(d["i"], d["x"]),
        )
        ab = float(schedule.alphas_cumprod[100])
        assert abs(seen[0].mean().item() - math.sqrt(ab) * MU) < 0.005
        assert abs(seen[0].std().item() - math.sqrt(1 - ab)) < 0.01

    def test_same_generator_same_output(self, schedule):
        ts = timestep_schedule(T_PARTIAL, 10)
        x = GaussianOracle(schedule).marginal(T_PARTIAL, gen())
        a, b, c = (self.run(schedule, x, ts, gen(seed)) for seed in (7, 7, 8))
        assert torch.equal(a, b)
        assert torch.equal(a, c) is not self.stochastic

    def test_callback_sees_every_step(self, schedule):
        ts = timestep_schedule(T_PARTIAL, 5)
        steps = []
        out = self.run(
            schedule,
            GaussianOracle(schedule).marginal(T_PARTIAL, gen()),
            ts,
            gen(),
            callback=steps.append,
        )
        assert [d["i"] for d in steps] == list(range(5)) and [d["t"] for d in steps] == ts
        assert all(d["x"].shape == SHAPE and d["x0"].shape == SHAPE for d in steps)
        assert torch.equal(steps[-1]["x"], out)

    @pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
    def test_prediction_types_give_the_same_samples(self, schedule, prediction_type):
        other = NoiseSchedule(prediction_type=prediction_type)
        ts = timestep_schedule(T_PARTIAL, 10)
        x = GaussianOracle(schedule).marginal(T_PARTIAL, gen(), dtype=torch.float64)
        ref = self.run(schedule, x, ts, gen(5))
        out = self.run(other, x, ts, gen(5))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-8)


class TestDDPM(SamplerOracleBase):
    name, stochastic = "ddpm", True
    from_noise, partial = (999, "linear"), (T_PARTIAL, "linear")


class TestDDIM(SamplerOracleBase):
    name, options = "ddim", {"eta": 0.0}
    from_noise, partial = (50, "logsnr"), (50, "linear")


class TestDDIMEta1(SamplerOracleBase):
    name, options, stochastic = "ddim", {"eta": 1.0}, True
    from_noise, partial = (999, "linear"), (T_PARTIAL, "linear")


class TestDPMSolverPP2M(SamplerOracleBase):
    name = "dpmpp2m"
    from_noise, partial = (10, "logsnr"), (10, "logsnr")


def _rotation_law_std(schedule, ts):
    """DDIM(eta=0) on a Gaussian rotates (sqrt(ab) SD, sqrt(1-ab)) and shrinks the std by the
    cosine of each step's angle; the exact output std for a start at the exact marginal."""
    angle = [
        math.atan2(math.sqrt(1 - a), math.sqrt(a) * SD)
        for a in [float(schedule.alphas_cumprod[t]) for t in ts] + [1.0]
    ]
    return SD * math.prod(math.cos(a - b) for a, b in zip(angle, angle[1:], strict=False))


@pytest.mark.parametrize("t_start,steps", [(999, 10), (T_PARTIAL, 10), (T_PARTIAL, 3)])
def test_ddim_follows_the_exact_gaussian_rotation_law(schedule, t_start, steps):
    ts = timestep_schedule(t_start, steps)
    x = GaussianOracle(schedule).marginal(t_start, gen(), dtype=torch.float64)
    out = S.ddim(GaussianOracle(schedule), x, ts, schedule)
    # DDIM is affine on this oracle: deviations from sqrt(ab) MU scale by the law's ratio
    ab = float(schedule.alphas_cumprod[t_start])
    gain = _rotation_law_std(schedule, ts) / math.sqrt(ab * SD**2 + 1 - ab)
    torch.testing.assert_close(out, MU + gain * (x - math.sqrt(ab) * MU), rtol=0, atol=1e-8)
    assert abs(out.std().item() - _rotation_law_std(schedule, ts)) < 0.005


def _exact_output_std(schedule, name, t_start, steps):
    """A deterministic sampler is affine on this oracle: its output std follows from two points."""
    ab = float(schedule.alphas_cumprod[t_start])
    m = math.sqrt(ab) * MU
    x = torch.tensor([m - 1.0, m + 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    out = get_sampler(name)(
        GaussianOracle(schedule), x, timestep_schedule(t_start, steps), schedule
    )
    gain = (out[1] - out[0]).item() / 2.0
    return gain * math.sqrt(ab * SD**2 + 1 - ab)


@pytest.mark.parametrize("name,low,high", [("ddim", 1.5, 2.5), ("dpmpp2m", 3.0, 6.0)])
def test_deterministic_samplers_converge_at_their_order(schedule, name, low, high):
    """Doubling the steps divides the error by about 2 (first order) or 4 (second order)."""
    errors = [abs(_exact_output_std(schedule, name, T_PARTIAL, n) - SD) for n in (10, 20, 40)]
    ratios = [a / b for a, b in zip(errors, errors[1:], strict=False)]
    assert all(low < r < high for r in ratios), ratios


def test_ddim_eta1_is_ddpm(schedule):
    ts = timestep_schedule(T_PARTIAL, 10)
    x = GaussianOracle(schedule).marginal(T_PARTIAL, gen(), dtype=torch.float64)
    a = S.ddpm(GaussianOracle(schedule), x, ts, schedule, generator=gen(4))
    b = S.ddim(GaussianOracle(schedule), x, ts, schedule, generator=gen(4), eta=1.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_equals_monai_step_at_full_length(prediction_type, dtype):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    monai = schedule.to_monai()
    if dtype == torch.float64:  # MONAI's step in float64 arithmetic: the formulas must agree
        monai.betas = monai.betas.double()
        monai.alphas, monai.alphas_cumprod = 1 - monai.betas, schedule.alphas_cumprod
        monai.one = torch.tensor(1.0, dtype=dtype)
    monai.set_timesteps(1000)
    oracle = GaussianOracle(schedule)
    x = oracle.marginal(999, gen(), dtype=dtype)[:4]
    g, y = gen(11), x.clone()
    for t in monai.timesteps:
        y, _ = monai.step(oracle(y, t.repeat(4)), int(t), y, generator=g)
    ours = S.ddpm(oracle, x, monai.timesteps, schedule, generator=gen(11))
    # stock MONAI works in float32 and its rounding accumulates over 1000 steps
    atol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(ours, y, rtol=0, atol=atol)


def test_monai_ddpm_is_wrong_with_50_steps_and_ours_is_not(schedule):
    """Known MONAI pitfall: DDPMScheduler.step always goes to t-1, so set_timesteps(50) fails."""
    monai = schedule.to_monai()
    monai.set_timesteps(50)
    oracle = GaussianOracle(schedule)
    x = oracle.marginal(int(monai.timesteps[0]), gen())
    g, y = gen(12), x.clone()
    for t in monai.timesteps:
        y, _ = monai.step(oracle(y, t.repeat(SHAPE[0])), int(t), y, generator=g)
    assert abs(y.std().item() - SD) > 0.2 or abs(y.mean().item() - MU) > 0.1
    ours = S.ddpm(oracle, x, monai.timesteps, schedule, generator=gen(12))
    # ancestral sampling at 50 steps still under-disperses a little (0.16 here); it converges
    # with steps (TestDDPM), MONAI's does not
    assert_matches_data(ours, std_tol=0.05)


def test_x0_sampler_returns_the_posterior_mean_in_one_call(schedule):
    oracle = GaussianOracle(schedule)
    x = oracle.marginal(T_PARTIAL, gen(), dtype=torch.float64)
    out = S.x0(oracle, x, [T_PARTIAL, 100, 10], schedule)
    assert oracle.calls == 1
    torch.testing.assert_close(out, oracle.x0_mean(x, T_PARTIAL), rtol=0, atol=1e-10)
    torch.testing.assert_close(out, S.x0(oracle, x, [T_PARTIAL], schedule), rtol=0, atol=0)
    ab = float(schedule.alphas_cumprod[T_PARTIAL])
    shrunk = SD * math.sqrt(ab * SD**2 / (ab * SD**2 + 1 - ab))  # a mean, not a sample
    assert abs(out.std().item() - shrunk) < 0.005


def test_clip_clamps_the_x0_estimate(schedule):
    oracle = GaussianOracle(schedule, mu=3.0, sd=0.1)
    x = oracle.marginal(T_PARTIAL, gen())
    for name in SAMPLERS:
        seen = []
        out = get_sampler(name)(
            oracle, x, [T_PARTIAL, 100], schedule, generator=gen(), callback=seen.append, clip=True
        )
        assert all(d["x0"].max() <= 1.0 for d in seen) and out.max() <= 1.0 + 1e-6


def test_model_receives_extra_args(schedule):
    got = []

    def model(x, t, class_labels=None):
        got.append(class_labels)
        return torch.zeros_like(x)

    labels = torch.tensor([1, 0])
    for name in SAMPLERS:
        get_sampler(name)(
            model, torch.zeros(2, 1, 4, 4), [20, 10], schedule, extra_args={"class_labels": labels}
        )
    assert len(got) == 7 and all(lab is labels for lab in got)


def test_timestep_schedule_is_evenly_spaced_and_decreasing(schedule):
    assert timestep_schedule(250, 10) == list(range(250, 0, -25))
    assert timestep_schedule(999, 999) == list(range(999, 0, -1))
    assert timestep_schedule(7, 1) == [7]
    for spacing in ("linear", "logsnr"):
        for t_start, steps in [(999, 10), (999, 50), (250, 250), (30, 29), (5, 5)]:
            ts = timestep_schedule(t_start, steps, spacing=spacing, schedule=schedule)
            assert len(ts) == steps and ts[0] == t_start and ts[-1] >= 1
            assert all(a > b for a, b in zip(ts, ts[1:], strict=False))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"t_start": 1000, "steps": 10}, "noise_level"),
        ({"t_start": 0, "steps": 1}, "noise_level"),
        ({"t_start": 10, "steps": 11}, "steps"),
        ({"t_start": 10, "steps": 0}, "steps"),
        ({"t_start": 10, "steps": 5, "spacing": "karras"}, "spacing"),
    ],
)
def test_timestep_schedule_rejects_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        timestep_schedule(**kwargs)


def test_samplers_reject_timesteps_that_do_not_decrease(schedule):
    for ts in ([10, 10], [5, 10], [1000], []):
        with pytest.raises(ValueError, match="timesteps"):
            S.ddim(GaussianOracle(schedule), torch.zeros(SHAPE), ts, schedule)


def test_get_sampler_and_nfe():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpmpp2m", "x0"}
    with pytest.raises(ConfigError) as err:
        get_sampler("euler")
    assert all(name in str(err.value) for name in SAMPLERS)
    assert [nfe(n, 10) for n in ("ddpm", "ddim", "dpmpp2m", "x0")] == [10, 10, 10, 1]
    with pytest.raises(ConfigError):
        nfe("euler", 10)


def test_every_sampler_has_a_one_line_docstring_naming_its_paper():
    for fn in SAMPLERS.values():
        first = fn.__doc__.strip().splitlines()[0]
        assert any(year in first for year in ("2020", "2021", "2022")), first


# ---- the noise schedule -------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_split_inverts_training_target(prediction_type):
    schedule = NoiseSchedule(prediction_type=prediction_type)
    g = gen()
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = schedule.add_noise(x0, noise, t)
    eps, x0_hat = schedule.split(schedule.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(eps, noise, rtol=0, atol=2e-3)  # eps from x0 at t=0 amplifies 100x
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=2e-3)


def test_add_noise_uses_alphas_cumprod(schedule):
    x0, noise = torch.ones(2, 1, 3, 3), torch.full((2, 1, 3, 3), 2.0)
    t = torch.tensor([10, 700])
    ab = schedule.alphas_cumprod[t].float().view(2, 1, 1, 1)
    expected = (ab.sqrt() + 2 * (1 - ab).sqrt()).expand(2, 1, 3, 3)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), expected)
    # the same schedule as MONAI's (whose float32 product drifts by ~1e-6)
    monai = schedule.to_monai()
    torch.testing.assert_close(
        schedule.alphas_cumprod, monai.alphas_cumprod.double(), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"schedule": "scaled_linear_beta", "beta_start": 0.0015, "beta_end": 0.0195},
        {"schedule": "cosine", "prediction_type": "v_prediction", "num_train_timesteps": 500},
        {"schedule": "sigmoid_beta", "sig_range": 4.0},
    ],
)
def test_schedule_config_round_trip(config):
    a = NoiseSchedule(**config)
    b = NoiseSchedule.from_config(a.to_config())
    assert a.to_config() == b.to_config()
    assert torch.equal(a.alphas_cumprod, b.alphas_cumprod)
    assert len(a.alphas_cumprod) == a.num_train_timesteps
    assert torch.all(a.alphas_cumprod[1:] < a.alphas_cumprod[:-1])


@pytest.mark.parametrize(
    "config,key",
    [
        ({"schedule": "quadratic"}, "schedule"),
        ({"prediction_type": "score"}, "prediction_type"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"schedule": "cosine", "sig_range": 3}, "sig_range"),
    ],
)
def test_schedule_rejects_bad_config_naming_the_key(config, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        NoiseSchedule(**config)
