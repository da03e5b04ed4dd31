"""The method: EDM (edm.py), the law of sigma (lognormal.py), the block partition
(partition.py), masking (masking.py), block schedules (schedules.py), sampling
(sampling.py) and the training objectives (objectives.py).

The names of edm.py, lognormal.py, partition.py's sigma functions and sampling.py's steps
are re-exported here, so `from diffusion_blocks import diffusion; diffusion.c_skip(...)`
reads as before."""

from .edm import (  # noqa: F401 (re-exported)
    broadcast_sigma,
    c_in,
    c_noise,
    c_out,
    c_skip,
    denoised_estimate,
    loss_weight,
    NoiseSchedule,
)
from .lognormal import (  # noqa: F401 (re-exported)
    lognormal_cdf,
    lognormal_icdf,
    sample_sigma,
    sample_sigma_log_uniform,
    SIGMA_LAWS,
    truncated_mass,
)
from .partition import (  # noqa: F401 (re-exported)
    block_interval,
    block_of_sigma,
    block_sigma_boundaries,
    block_training_interval,
    equiprobable_boundaries,
    PARTITIONS,
    uniform_log_boundaries,
    widen_interval,
)
from .sampling import (  # noqa: F401 (re-exported)
    churn,
    churn_gamma,
    network_evaluations,
    walk_plan,
    euler_step,
    EulerStep,
    expected_clean_embedding,
    heun_step,
    initial_noise_scale,
    noised,
    ode_slope,
    sampling_plan,
    sampling_sigmas,
)
