"""Sampler values and trajectories: rCM against TurboDiffusion's recursion, UniPC against diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.sampling import (
    WAN_FLOW_SIGMA_MAX,
    SamplingCanceled,
    cfg_velocity,
    classifier_free_guidance,
    expert_schedule,
    unipc_expert_schedule,
    flow_model_timesteps,
    flow_unipc_sigmas,
    rcm_model_timesteps,
    rcm_sample,
    rcm_timesteps,
    unipc_sample,
)

SHAPE = (2, 4, 3, 5, 6)  # [B, C, F, H, W], tiny latent


def _toy_velocity(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random per-element weights for a nonlinear, timestep-dependent toy velocity."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(SHAPE, generator=g) * 2 - 1, torch.randn(SHAPE, generator=g)


# ---------------------------------------------------------------------------------------------------------
# rCM schedule
# ---------------------------------------------------------------------------------------------------------


def test_rcm_timesteps_match_turbodiffusion_values() -> None:
    # Values from turbodiffusion.md §4.2 (s = sin θ / (sin θ + cos θ) of [atan 80, 1.5, 1.4, 1.0, 0]).
    assert rcm_timesteps(4, 80) == pytest.approx([0.98765, 0.93378, 0.85290, 0.60898, 0.0], abs=5e-6)
    # s_0 = sigma_max / (1 + sigma_max) exactly: 200/201 = 0.995024875...
    assert rcm_timesteps(4, 200)[0] == pytest.approx(200 / 201, rel=1e-15)
    assert rcm_timesteps(1, 200) == pytest.approx([0.9950248756, 0.0], abs=1e-10)
    # Fewer steps keep the leading angles: N steps = the first N times of the 4-step schedule, then 0.
    full = rcm_timesteps(4, 80)
    for n in range(1, 5):
        assert rcm_timesteps(n, 80) == [*full[:n], 0.0]


@pytest.mark.parametrize("num_steps", [0, 5, 2.0, True, -1])
def test_rcm_timesteps_rejects_bad_num_steps(num_steps: object) -> None:
    with pytest.raises(ValueError, match="num_steps"):
        rcm_timesteps(num_steps, 80)  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma_max", [0.0, -3.0, math.inf, math.nan])
def test_rcm_timesteps_rejects_bad_sigma_max(sigma_max: float) -> None:
    with pytest.raises(ValueError, match="sigma_max"):
        rcm_timesteps(4, sigma_max)


@pytest.mark.parametrize(
    ("sigma_max", "expected"),
    [
        (80, [988, 932, 852, 608]),
        (120, [992, 932, 852, 608]),
        (200, [996, 932, 852, 608]),
        (1600, [1000, 932, 852, 608]),
    ],
)
def test_rcm_model_timesteps_are_bf16_rounded(sigma_max: float, expected: list[int]) -> None:
    # turbodiffusion.md §4.2 table: bf16 spacing is 4 in [512, 1024), so 987.654 -> 988, 933.781 -> 932.
    assert rcm_model_timesteps(rcm_timesteps(4, sigma_max)) == expected


@pytest.mark.parametrize("boundary", [0.9, 0.875])
@pytest.mark.parametrize("sigma_max", [80, 200])
@pytest.mark.parametrize(
    ("num_steps", "expected"), [(4, [0, 0, 1, 1]), (3, [0, 0, 1]), (2, [0, 0]), (1, [0])]
)
def test_expert_schedule_switches_once_below_boundary(
    boundary: float, sigma_max: float, num_steps: int, expected: list[int]
) -> None:
    # turbodiffusion.md §5: s = 0.99, 0.934 (high), 0.853, 0.609 (low); 1-2 steps use only the high expert.
    assert expert_schedule(rcm_timesteps(num_steps, sigma_max), boundary) == expected


def test_expert_schedule_without_boundary_uses_one_expert() -> None:
    assert expert_schedule(rcm_timesteps(4, 80), None) == [0, 0, 0, 0]


def test_expert_schedule_never_switches_back() -> None:
    # Non-monotone times (not produced by rCM) still switch once: TurboDiffusion keeps a `switched` flag.
    assert expert_schedule([0.95, 0.85, 0.95, 0.5, 0.0], 0.9) == [0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------
# rCM sampling
# ---------------------------------------------------------------------------------------------------------


def _turbodiffusion_reference(
    velocity, num_steps: int, sigma_max: float, seed: int, ode: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """TurboDiffusion's loop (wan2.2_i2v_infer.py), written with its own float64 tensor arithmetic."""
    generator = generator or torch.Generator().manual_seed(seed)
    init_noise = torch.randn(*SHAPE, dtype=torch.float32, generator=generator)
    t_steps = torch.tensor([math.atan(sigma_max), *[1.5, 1.4, 1.0][: num_steps - 1], 0], dtype=torch.float64)
    t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    x = init_noise.to(torch.float64) * t_steps[0]
    ones = torch.ones(x.size(0), dtype=torch.float64)
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        v = velocity(x.to(torch.bfloat16), (t_cur * ones * 1000).to(torch.bfloat16)).to(torch.float64)
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            x = (1 - t_next) * (x - t_cur * v) + t_next * torch.randn(
                *x.shape, dtype=torch.float32, generator=generator
            )
    return x.float()


@pytest.mark.parametrize("ode", [False, True])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_rcm_sample_matches_turbodiffusion_recursion(ode: bool, num_steps: int) -> None:
    weight, offset = _toy_velocity(1)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Nonlinear in x and dependent on t, so a wrong state, timestep or noise draw shows up.
        return (torch.tanh(weight * x.float()) + offset * t.float().view(-1, 1, 1, 1, 1) / 1000).to(x.dtype)

    seen: list[tuple[torch.dtype, torch.Tensor, int]] = []

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        seen.append((x.dtype, t.clone(), step))
        return velocity(x, t)

    timesteps = rcm_timesteps(num_steps, 80)
    generator, ref_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    out = rcm_sample(velocity_fn, SHAPE, timesteps=timesteps, generator=generator, device="cpu", ode=ode)
    ref = _turbodiffusion_reference(velocity, num_steps, 80, seed=7, ode=ode, generator=ref_generator)
    # RNG-stream parity: the same number of draws (SDE draws on every step, the last one included).
    assert torch.equal(generator.get_state(), ref_generator.get_state())
    assert out.dtype == torch.float32 and out.shape == SHAPE
    # Same float64 recursion on the same bf16 model inputs; the only difference is math.sin vs torch.sin (an
    # ulp of float64), far below one fp32 ulp of the output.
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert [s for _, _, s in seen] == list(range(num_steps))
    assert all(dtype == torch.bfloat16 for dtype, _, _ in seen)
    expected_t = [988, 932, 852, 608][:num_steps]
    for (_, t, _), t_value in zip(seen, expected_t):
        assert t.dtype == torch.bfloat16 and t.shape == (SHAPE[0],)
        assert t.float().tolist() == [t_value] * SHAPE[0]
    # The comparison above can fail: another seed differs, and so does the other mode after the first step
    # (with one step both return the first x̂0).
    assert (out - _turbodiffusion_reference(velocity, num_steps, 80, seed=8, ode=ode)).abs().max() > 1e-2
    if num_steps > 1:
        other_mode = _turbodiffusion_reference(velocity, num_steps, 80, seed=7, ode=not ode)
        assert (out - other_mode).abs().max() > 1e-2


def test_rcm_sample_model_dtype_float32_for_cpu_models() -> None:
    dtypes = []

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        dtypes.append((x.dtype, t.dtype))
        return -x

    rcm_sample(velocity_fn, SHAPE, timesteps=rcm_timesteps(2, 80), generator=torch.Generator().manual_seed(0),
               device="cpu", model_dtype=torch.float32)
    assert dtypes == [(torch.float32, torch.bfloat16)] * 2


def test_rcm_sample_is_deterministic_per_seed() -> None:
    weight, _ = _toy_velocity(2)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return rcm_sample(lambda x, t, i: torch.sin(weight * x.float()).to(x.dtype), SHAPE,
                          timesteps=rcm_timesteps(4, 80), generator=generator, device="cpu")

    torch.testing.assert_close(run(3), run(3), atol=0, rtol=0)  # same seed, same generator stream: bit-equal
    assert (run(3) - run(4)).abs().max() > 0.1


def test_rcm_sample_reports_progress_and_cancels_before_a_step() -> None:
    done: list[int] = []
    calls: list[int] = []

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        calls.append(step)
        return x

    with pytest.raises(SamplingCanceled) as info:
        rcm_sample(velocity_fn, SHAPE, timesteps=rcm_timesteps(4, 80), generator=torch.Generator(),
                   device="cpu", on_step=done.append, should_cancel=lambda: len(done) == 2)
    assert info.value.finished_steps == 2 and done == [1, 2] and calls == [0, 1]


def test_rcm_sample_rejects_timesteps_not_ending_at_zero() -> None:
    with pytest.raises(ValueError, match="ending at 0"):
        rcm_sample(lambda x, t, i: x, SHAPE, timesteps=[0.9, 0.5], generator=torch.Generator(), device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Baseline: flow UniPC + CFG
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_steps", "shift", "head", "tail"),
    [
        (50, 5.0, [999, 995, 991, 987], [302, 241, 172, 92]),
        (40, 12.0, [999, 997, 995, 993], [571, 492, 386, 235]),
        (40, 5.0, [999, 994, 989, 983], [356, 288, 208, 113]),
    ],
)
def test_flow_model_timesteps_match_official_examples(
    num_steps: int, shift: float, head: list[int], tail: list[int]
) -> None:
    # wan.md §10.2, from the official FlowUniPCMultistepScheduler.
    sigmas = flow_unipc_sigmas(num_steps, shift)
    timesteps = flow_model_timesteps(sigmas)
    assert len(sigmas) == num_steps + 1 and sigmas[-1] == 0.0
    assert timesteps[:4] == head and timesteps[-4:] == tail


def test_flow_unipc_sigmas_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        flow_unipc_sigmas(0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        flow_unipc_sigmas(10, 0.0)


@pytest.mark.parametrize(
    ("num_steps", "shift", "boundary", "high_steps"), [(40, 12.0, 0.875, 26), (40, 5.0, 0.9, 15)]
)
def test_unipc_expert_schedule_matches_official_split(
    num_steps: int, shift: float, boundary: float, high_steps: int
) -> None:
    # wan.md §8: T2V-A14B defaults run 26 high / 14 low steps, I2V-A14B 15 / 25; the high expert comes first.
    schedule = unipc_expert_schedule(flow_unipc_sigmas(num_steps, shift), boundary)
    assert schedule == [0] * high_steps + [1] * (num_steps - high_steps)
    assert unipc_expert_schedule(flow_unipc_sigmas(num_steps, shift), None) == [0] * num_steps


@pytest.mark.parametrize("num_steps", [1, 2, 3, 10])
def test_unipc_sample_matches_diffusers(num_steps: int) -> None:
    from diffusers import UniPCMultistepScheduler

    shift = 5.0
    weight, offset = _toy_velocity(3)
    bias = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return weight * x + offset * (t.float().view(-1, 1, 1, 1, 1) / 1000) + bias  # linear in x

    # wan.md §10.4: diffusers reproduces Wan's schedule when given Wan's unshifted base sigmas.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=shift, num_train_timesteps=1000)
    scheduler.set_timesteps(sigmas=np.linspace(WAN_FLOW_SIGMA_MAX, 0.0, num_steps + 1)[:-1])
    ref_inputs = []
    x = noise.clone()
    for t in scheduler.timesteps:
        ref_inputs.append(x)
        x = scheduler.step(velocity(x, t.repeat(SHAPE[0])), t, x).prev_sample

    inputs = []

    def velocity_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.shape == (SHAPE[0],)
        inputs.append(x)
        return velocity(x, t)

    sigmas = flow_unipc_sigmas(num_steps, shift)
    out = unipc_sample(velocity_fn, noise, sigmas=sigmas)
    assert flow_model_timesteps(sigmas) == scheduler.timesteps.tolist()
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float32), scheduler.sigmas, atol=0, rtol=0)
    # Brief: max diff <= 1e-6 on every model input and the output (same float32 coefficients, same op order).
    assert len(inputs) == len(ref_inputs) == num_steps
    for mine, ref in zip(inputs, ref_inputs):
        assert (mine - ref).abs().max().item() <= 1e-6
    assert (out - x).abs().max().item() <= 1e-6
    assert x.abs().max() > 0.5  # a non-trivial trajectory


def test_cfg_velocity_matches_official_formula() -> None:
    cond, uncond = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(cfg_velocity(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond))
    torch.testing.assert_close(cfg_velocity(cond, uncond, 1.0), cond)


def test_classifier_free_guidance_uses_the_scale_of_each_step() -> None:
    calls: list[tuple[str, int]] = []

    def cond_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        calls.append(("cond", step))
        return torch.ones_like(x)

    def uncond_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        calls.append(("uncond", step))
        return torch.zeros_like(x)

    guided = classifier_free_guidance(cond_fn, uncond_fn, [4.0, 3.0])
    x, t = torch.zeros(2), torch.zeros(1, dtype=torch.int64)
    assert guided(x, t, 0).tolist() == [4.0, 4.0] and guided(x, t, 1).tolist() == [3.0, 3.0]
    assert calls == [("cond", 0), ("uncond", 0), ("cond", 1), ("uncond", 1)]
    assert classifier_free_guidance(cond_fn, uncond_fn, 6.0)(x, t, 7).tolist() == [6.0, 6.0]


def test_unipc_sample_reports_progress_and_cancels_before_a_step() -> None:
    done: list[int] = []
    with pytest.raises(SamplingCanceled) as info:
        unipc_sample(lambda x, t, i: x, torch.randn(SHAPE), sigmas=flow_unipc_sigmas(10, 5.0),
                     on_step=done.append, should_cancel=lambda: len(done) == 3)
    assert info.value.finished_steps == 3 and done == [1, 2, 3]
