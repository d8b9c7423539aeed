"""Samplers: TurboDiffusion's rCM (1-4 steps) and the baseline flow-matching UniPC with CFG (Wan's own).

Both work in Wan's rectified-flow (RF) parameterisation: `x_s = (1 - s)·x0 + s·ε`, s ∈ [0, 1], and the DiT
predicts the velocity `v = ε - x0` given the timestep 1000·s, so `x0 = x_s - s·v`.

rCM (TurboDiffusion `turbodiffusion/inference/wan2.{1,2}_*_infer.py`, identical to NVlabs/rcm):
    angles θ = [atan(sigma_max), 1.5, 1.4, 1.0][:N] then 0; s_i = sin θ_i / (sin θ_i + cos θ_i) in float64
    x = float64(ε_0)·s_0                                  ε_0 fp32 from the seeded generator
    for i in 0..N-1:
        v  = float64(net(bf16(x), bf16(1000·s_i)))
        x̂0 = x - s_i·v
        SDE (default): x = (1 - s_{i+1})·x̂0 + s_{i+1}·ε_{i+1}   fresh fp32 noise, drawn on every step
        ODE (--ode):   x = x - (s_i - s_{i+1})·v                 Euler in RF time
    output fp32(x) (= x̂0 of the last step, since s_N = 0)

Baseline ("original" mode, the official Wan sampler; Wan-Video/Wan2.1 `wan/utils/fm_solvers_unipc.py`
`FlowUniPCMultistepScheduler`, a port of diffusers' `UniPCMultistepScheduler`): UniPC multistep, bh2, order 2,
predict_x0, lower_order_final, on the shifted schedule σ' = shift·σ / (1 + (shift - 1)·σ) with
σ = linspace(0.999, 0, N+1)[:N] and a final σ = 0; the model sees int64(1000·σ); classifier-free guidance
`uncond + g·(cond - uncond)` with two forward passes.

Both samplers keep the step loop lean: every schedule value, model timestep tensor and solver coefficient is
computed on the host before the loop, so a step is the model call plus a few elementwise ops, with no
`.item()`, no host sync and no Python branch on tensor values (only on the host-side step index).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# velocity_fn(x, t_model [B], step_index) -> velocity shaped like x. The step index lets the caller pick the
# expert (Wan2.2-A14B) or the guidance scale for that step.
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ProgressFn = Callable[[int], None]  # called with the number of finished steps
CancelFn = Callable[[], bool]  # True -> stop before the next step

# rCM's intermediate TrigFlow angles for 2-4 steps, "for better visual quality" (TurboDiffusion
# `mid_t = [1.5, 1.4, 1.0]`; rCM training's `backward_timesteps` default is the same list).
RCM_MID_ANGLES: tuple[float, ...] = (1.5, 1.4, 1.0)
RCM_MAX_STEPS = len(RCM_MID_ANGLES) + 1

NUM_TRAIN_TIMESTEPS = 1000  # Wan's timestep scale: the DiT sees 1000·s

# Official FlowUniPCMultistepScheduler.__init__ builds sigmas = 1 - linspace(1, 1/1000, 1000)[::-1] as a
# float32 tensor and takes sigma_max = sigmas[0].item(), i.e. 0.999 rounded to float32 (0.99900001287...);
# sigma_min = 0. set_timesteps then runs linspace(sigma_max, sigma_min, N + 1) in float64.
WAN_FLOW_SIGMA_MAX = float(np.float32(0.999))


class SamplingCanceled(Exception):
    """Raised by a sampler when `should_cancel()` returned True before a step."""

    def __init__(self, finished_steps: int) -> None:
        super().__init__(f"sampling canceled after {finished_steps} finished step(s)")
        self.finished_steps = finished_steps


# ---------------------------------------------------------------------------------------------------------
# rCM (TurboDiffusion)
# ---------------------------------------------------------------------------------------------------------


def rcm_timesteps(num_steps: int, sigma_max: float) -> list[float]:
    """RF times s_0 > … > s_{N-1} > s_N = 0 of TurboDiffusion's rCM sampler, in float64.

    Args:
        num_steps: N, 1 to 4 (TurboDiffusion's `--num_steps` choices).
        sigma_max: initial EDM sigma (80 for T2V, 200 for I2V in TurboDiffusion);
            s_0 = sigma_max / (1 + sigma_max).

    Returns:
        num_steps + 1 floats ending at 0. `rcm_timesteps(4, 80)` = 0.98765, 0.93378, 0.85290, 0.60898, 0.

    Raises:
        ValueError: num_steps outside 1..4 or sigma_max not a finite positive number.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= RCM_MAX_STEPS:
        raise ValueError(f"rCM num_steps must be an integer in 1..{RCM_MAX_STEPS}, got {num_steps!r}")
    if not math.isfinite(sigma_max) or sigma_max <= 0:
        raise ValueError(f"rCM sigma_max must be a finite number > 0, got {sigma_max!r}")
    angles = [math.atan(sigma_max), *RCM_MID_ANGLES[: num_steps - 1], 0.0]
    # TrigFlow angle -> RF time (turbodiffusion: t_steps = sin(t) / (cos(t) + sin(t)) in float64).
    return [math.sin(theta) / (math.sin(theta) + math.cos(theta)) for theta in angles]


def rcm_model_timesteps(timesteps: Sequence[float]) -> list[float]:
    """The timestep the DiT sees at each rCM step: 1000·s_i rounded to bf16.

    988, 932, 852, 608 at sigma_max 80. TurboDiffusion feeds `(t_cur * 1000).to(bfloat16)`; training's c_noise
    goes through the same cast, so train and test agree (bf16 spacing is 4 in [512, 1024)).
    """
    scaled = torch.tensor([s * NUM_TRAIN_TIMESTEPS for s in timesteps[:-1]], dtype=torch.float64)
    return scaled.to(torch.bfloat16).float().tolist()


def expert_schedule(timesteps: Sequence[float], boundary: float | None) -> list[int]:
    """Which Wan2.2-A14B expert runs each rCM step: 0 = high-noise, 1 = low-noise.

    TurboDiffusion `wan2.2_i2v_infer.py`: before each step, `if t_cur < boundary and not switched` it swaps to
    the low-noise expert, at most once; the comparison uses the float64 RF time. With sigma_max 200 and
    boundary 0.9: 4 steps -> H, H, L, L; 3 -> H, H, L; 2 and 1 -> H only.

    Args:
        timesteps: the num_steps + 1 RF times of `rcm_timesteps`.
        boundary: RF time of the switch (0.9 I2V-A14B, 0.875 T2V-A14B); None for one-expert models.

    Returns:
        num_steps expert indices.
    """
    schedule: list[int] = []
    switched = False
    for s in timesteps[:-1]:
        switched = switched or (boundary is not None and s < boundary)
        schedule.append(1 if switched else 0)
    return schedule


def rcm_sample(
    velocity_fn: VelocityFn,
    noise_shape: Sequence[int],
    *,
    timesteps: Sequence[float],
    generator: torch.Generator,
    device: torch.device | str,
    ode: bool = False,
    model_dtype: torch.dtype = torch.bfloat16,
    on_step: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> torch.Tensor:
    """Sample with rCM exactly as TurboDiffusion (module docstring); returns the fp32 x̂0 of the last step.

    Args:
        velocity_fn: (x in model_dtype, t_model [B] bf16 holding 1000·s_i, step index) -> velocity like x.
        noise_shape: [B, C, F, H, W] of the latent.
        timesteps: RF times from `rcm_timesteps` (num_steps + 1, ending at 0).
        generator: seeded torch.Generator on `device`; draws ε_0 and, in SDE mode, one fresh ε per step
            (also on the last step, where s_N = 0 cancels it, so the RNG stream matches TurboDiffusion's).
        device: where the state and the noise live.
        ode: Euler in RF time instead of the SDE re-noising (TurboDiffusion I2V `--ode`).
        model_dtype: dtype of the model input; bf16 as TurboDiffusion, fp32 for a CPU model.
        on_step: called with i + 1 after step i.
        should_cancel: polled before every step.

    Returns:
        fp32 latent shaped noise_shape.

    Raises:
        SamplingCanceled: should_cancel() returned True.
    """
    if len(timesteps) < 2 or timesteps[-1] != 0.0:
        raise ValueError(f"timesteps must hold num_steps + 1 RF times ending at 0, got {list(timesteps)}")
    shape = tuple(noise_shape)
    model_t = [  # [B] per step, built once before the loop
        torch.full((shape[0],), t, dtype=torch.bfloat16, device=device)
        for t in rcm_model_timesteps(timesteps)
    ]
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(torch.float64)
    x = x * timesteps[0]
    for i, (s_cur, s_next) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if should_cancel is not None and should_cancel():
            raise SamplingCanceled(i)
        v = velocity_fn(x.to(model_dtype), model_t[i], i).to(torch.float64)
        if ode:
            x = x - (s_cur - s_next) * v
        else:
            fresh = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            # s_next·ε is formed in fp32 and added to the float64 state, as the reference's 0-dim float64
            # t_next times an fp32 tensor does under torch's type promotion.
            x = (1.0 - s_next) * (x - s_cur * v) + s_next * fresh
        if on_step is not None:
            on_step(i + 1)
    return x.float()


# ---------------------------------------------------------------------------------------------------------
# Baseline: flow-matching UniPC (bh2, order 2) + classifier-free guidance (official Wan)
# ---------------------------------------------------------------------------------------------------------


def flow_unipc_sigmas(num_steps: int, shift: float) -> list[float]:
    """Wan's shifted flow sigmas for `num_steps` UniPC steps, with the final σ = 0 appended (N + 1 values).

    Official `set_timesteps(N, shift)`: σ = linspace(sigma_max, 0, N + 1)[:-1] in float64, then
    σ' = shift·σ / (1 + (shift - 1)·σ). The values stay float64: the model timesteps truncate these
    (`flow_model_timesteps`), while the solver works on their float32 rounding, as the official scheduler.

    Raises:
        ValueError: num_steps < 1 or shift not a finite positive number.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"UniPC num_steps must be a positive integer, got {num_steps!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"flow shift must be a finite number > 0, got {shift!r}")
    base = np.linspace(WAN_FLOW_SIGMA_MAX, 0.0, num_steps + 1)[:-1]
    shifted = shift * base / (1 + (shift - 1) * base)
    return [*shifted.tolist(), 0.0]


def flow_model_timesteps(sigmas: Sequence[float]) -> list[int]:
    """int64(1000·σ) per step, the official timestep (truncation): N=50, shift 5 -> 999, 995, …, 172, 92."""
    return [int(s * NUM_TRAIN_TIMESTEPS) for s in sigmas[:-1]]


def unipc_expert_schedule(sigmas: Sequence[float], boundary: float | None) -> list[int]:
    """Wan2.2-A14B expert per UniPC step: 0 (high-noise) while int timestep t >= boundary·1000, else 1.

    Official `_prepare_model_for_timestep` (Wan-Video/Wan2.2 `wan/text2video.py`, `image2video.py`). At the
    defaults, T2V (40 steps, shift 12, 0.875) runs 26 high / 14 low and I2V (40, shift 5, 0.9) 15 / 25.
    """
    if boundary is None:
        return [0] * (len(sigmas) - 1)
    boundary_t = boundary * NUM_TRAIN_TIMESTEPS
    return [0 if t >= boundary_t else 1 for t in flow_model_timesteps(sigmas)]


def cfg_velocity(cond: torch.Tensor, uncond: torch.Tensor, guide_scale: float) -> torch.Tensor:
    """Classifier-free guidance as official Wan: `uncond + g·(cond - uncond)`."""
    return uncond + guide_scale * (cond - uncond)


def classifier_free_guidance(
    cond_fn: VelocityFn, uncond_fn: VelocityFn, guide_scale: float | Sequence[float]
) -> VelocityFn:
    """A velocity function running the conditional and the unconditional pass and mixing them with CFG.

    Args:
        cond_fn, uncond_fn: velocity with the prompt / the negative prompt (the same expert for both, as the
            official A14B code).
        guide_scale: one scale, or one per step (A14B uses different scales for the two experts).
    """

    def guided(x: torch.Tensor, t_model: torch.Tensor, step: int) -> torch.Tensor:
        scale = guide_scale if isinstance(guide_scale, (int, float)) else guide_scale[step]
        return cfg_velocity(cond_fn(x, t_model, step), uncond_fn(x, t_model, step), scale)

    return guided


@dataclass(frozen=True)
class _UniPCUpdate:
    """Host-side coefficients of one UniPC bh2 update from σ_s to σ_t (float32 values, as the official code).

    x_t = ratio·x_s - m0_coef·m_s - res_coef·(rho_prev·(m_prev - m_s)/rk + rho_t·(m_t - m_s))
    with m the x0 predictions. The predictor (UniP) has no m_t term (rho_t = 0); the corrector (UniC) uses the
    model output at σ_t, evaluated at the predicted x_t. Order 1 has no m_prev term (rho_prev = 0).
    """

    order: int
    ratio: float  # σ_t / σ_s
    m0_coef: float  # α_t·(e^{-h} - 1), h = λ_t - λ_s
    res_coef: float  # α_t·B(h), B(h) = e^{-h} - 1 for bh2
    rk: float = 1.0  # (λ_prev - λ_s) / h; 1 (unused) for order 1
    rho_prev: float = 0.0
    rho_t: float = 0.0


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    # log-SNR of the flow schedule: alpha_t = 1 - σ, sigma_t = σ (diffusers `_sigma_to_alpha_sigma_t`).
    return torch.log(1 - sigma) - torch.log(sigma)


def _unipc_update(
    lam: list[torch.Tensor], sig: torch.Tensor, s: int, t: int, order: int, corrector: bool
) -> _UniPCUpdate:
    """Coefficients of diffusers `multistep_uni_p_bh_update` (corrector=False) / `multistep_uni_c_bh_update`.

    With predict_x0 and bh2: the order-2 predictor uses rho = 0.5; the corrector solves R·rho = b with
    R = [[1, 1], [rk, 1]] (order 2) or takes rho = 0.5 (order 1). Computed in float32 on 0-dim tensors like
    the official scheduler, so the values match it bit for bit. s, t index sig; the previous point is s - 1.
    """
    alpha_t = 1 - sig[t]
    h = lam[t] - lam[s]
    hh = -h  # predict_x0
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # bh2
    update = dict(order=order, ratio=(sig[t] / sig[s]).item(), m0_coef=(alpha_t * h_phi_1).item(),
                  res_coef=(alpha_t * b_h).item())
    rk = (lam[s - 1] - lam[s]) / h if order == 2 else torch.ones(())
    if not corrector:
        return _UniPCUpdate(**update, rk=rk.item(), rho_prev=0.5 if order == 2 else 0.0)
    if order == 1:
        return _UniPCUpdate(**update, rho_t=0.5)
    # b_k = h_phi_k·k! / B(h) with h_phi_1 = expm1(hh)/hh - 1 and h_phi_{k+1} = h_phi_k/hh - 1/(k+1)!.
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k * 1 / b_h
    h_phi_k = h_phi_k / hh - 1 / 2
    b2 = h_phi_k * 2 / b_h
    rks = torch.stack([rk, torch.ones(())])
    rhos = torch.linalg.solve(torch.stack([rks**0, rks**1]), torch.stack([b1, b2]))
    return _UniPCUpdate(**update, rk=rk.item(), rho_prev=rhos[0].item(), rho_t=rhos[1].item())


def _unipc_plan(sigmas: Sequence[float]) -> list[tuple[_UniPCUpdate | None, _UniPCUpdate]]:
    """Per step i: the corrector of the state x_i (None at i = 0) and the predictor i -> i + 1.

    diffusers `step`: predictor order = min(solver_order 2, warm-up i + 1, lower_order_final N - i); the
    corrector at step i re-solves i - 1 -> i in the previous step's predictor order.
    """
    num_steps = len(sigmas) - 1
    sig = torch.tensor(np.asarray(sigmas, dtype=np.float32))  # official: sigmas.astype(np.float32)
    lam = [_lambda(s) for s in sig]
    orders = [min(2, i + 1, num_steps - i) for i in range(num_steps)]
    return [
        (
            _unipc_update(lam, sig, i - 1, i, orders[i - 1], corrector=True) if i else None,
            _unipc_update(lam, sig, i, i + 1, orders[i], corrector=False),
        )
        for i in range(num_steps)
    ]


def _unipc_apply(
    u: _UniPCUpdate,
    x_s: torch.Tensor,
    m_s: torch.Tensor,
    m_prev: torch.Tensor | None,
    m_t: torch.Tensor | None,
) -> torch.Tensor:
    """x_t from x_s, in the official operation order (so the float32 results match it)."""
    x_t = u.ratio * x_s - u.m0_coef * m_s
    if m_t is None:  # predictor
        return x_t if u.order == 1 else x_t - u.res_coef * (u.rho_prev * ((m_prev - m_s) / u.rk))
    residual = u.rho_t * (m_t - m_s)
    if u.order == 2:
        residual = u.rho_prev * ((m_prev - m_s) / u.rk) + residual
    return x_t - u.res_coef * residual


def unipc_sample(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    *,
    sigmas: Sequence[float],
    on_step: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> torch.Tensor:
    """Flow-matching UniPC (bh2, order 2, predict_x0, lower_order_final) as the official Wan sampler.

    Args:
        velocity_fn: (x in noise's dtype, t_model [B] int64 = int(1000·σ_i), step index) -> velocity like x.
            Wrap it with `classifier_free_guidance` for the official two-pass CFG.
        noise: [B, C, F, H, W] initial latent (fp32 in the official code); the state keeps its dtype.
        sigmas: from `flow_unipc_sigmas` (N + 1 values ending at 0).
        on_step: called with i + 1 after step i.
        should_cancel: polled before every step.

    Returns:
        The denoised latent (the x0 prediction of the last step), noise's dtype.

    Raises:
        SamplingCanceled: should_cancel() returned True.
    """
    if len(sigmas) < 2 or sigmas[-1] != 0.0:
        raise ValueError(f"sigmas must hold num_steps + 1 values ending at 0, got {list(sigmas)}")
    plan = _unipc_plan(sigmas)
    sigmas_f32 = np.asarray(sigmas, dtype=np.float32).tolist()
    batch = noise.shape[0]
    model_t = [  # [B] per step, built once before the loop
        torch.full((batch,), t, dtype=torch.int64, device=noise.device) for t in flow_model_timesteps(sigmas)
    ]
    x = noise
    x_last = m_last = m_prev = None  # corrected state and x0 predictions of the previous steps
    for i, (corrector, predictor) in enumerate(plan):
        if should_cancel is not None and should_cancel():
            raise SamplingCanceled(i)
        v = velocity_fn(x, model_t[i], i).to(x.dtype)
        m = x - sigmas_f32[i] * v  # x0 prediction (diffusers `convert_model_output`, flow_prediction)
        if corrector is not None:
            x = _unipc_apply(corrector, x_last, m_last, m_prev, m)
        x_last, m_prev, m_last = x, m_last, m
        x = _unipc_apply(predictor, x, m, m_prev, None)
        if on_step is not None:
            on_step(i + 1)
    return x
