"""Every `[diffusion_blocks]` key is read or refused (registry.check_keys): each family
x each key, block-wise and end to end, with a generated non-default value."""

import dataclasses
import logging
from types import SimpleNamespace

import pytest

from diffusion_blocks.config.bounds import Bounds
from diffusion_blocks.config.checks import check_diffusion_blocks, DIFFUSION_BLOCKS_BOUNDS
from diffusion_blocks.config.sections import (
    DiffusionBlocks, HEAD_LOSSES, NONFINITE_POLICIES, OFFLOAD_MODES, TIME_CONDITIONINGS,
)
from diffusion_blocks.diffusion.lognormal import SIGMA_LAWS
from diffusion_blocks.diffusion.partition import PARTITIONS
from diffusion_blocks.diffusion.sampling import ODE_SAMPLERS
from diffusion_blocks.diffusion.schedules import BLOCK_SCHEDULES
from diffusion_blocks.errors import ConfigError
from diffusion_blocks.registry import check_keys, FAMILIES

KEYS = [f.name for f in dataclasses.fields(DiffusionBlocks)]
DEFAULTS = DiffusionBlocks()
CHOICES = {
    "partition": list(PARTITIONS),  # "explicit" is sigma_boundaries' companion
    # "weighted" needs block_weights (that key's own case sets both)
    "block_schedule": [s for s in BLOCK_SCHEDULES if s != "weighted"],
    "block0_sigma_sampling": list(SIGMA_LAWS), "offload_inactive_blocks": list(OFFLOAD_MODES),
    "sampler": list(ODE_SAMPLERS), "on_nonfinite": list(NONFINITE_POLICIES),
    "head_loss": list(HEAD_LOSSES), "masking_schedule": ["linear", "cosine", "poly2"],
    "time_conditioning": list(TIME_CONDITIONINGS),
}
# keys only valid with another one set (check_diffusion_blocks checks the pair)
COMPANIONS = {
    "block_weights": {"block_schedule": "weighted"},
    "head_loss_chunk_rows": {"head_loss": "chunked"},
    "layers_per_block": {"num_blocks": 2},
    "sigma_boundaries": {"partition": "explicit"},
}
# the leaks the allow-list closes: keys these families accepted without reading them
KNOWN_LEAKS = {
    "dblocks_llama3": ("cfg_scale", "label_dropout", "sampling_steps"),
    "dblocks_recurrent": ("cfg_scale", "label_dropout", "sampling_steps"),
    "dblocks_vit": (
        "cfg_scale", "label_dropout", "adaln_cond_dim", "target_embedding_scale",
        "token_embedding_init_std", "sampling_sigma_max", "sampling_steps",
    ),
    "dblocks_dit": (
        "sampling_sigma_max", "sigma_per_token", "target_embedding_scale",
        "token_embedding_init_std", "embedding_lr_multiplier", "sampling_steps_per_block",
        "adaln_cond_dim", "head_loss",
    ),
}


def number_in(bounds: Bounds, default):
    """A value of the default's type, within `bounds`, other than the default."""
    kind = type(default)
    for candidate in (default * 2, default + 1, default / 2, 1, 10, 0.5):
        candidate = kind(candidate)
        if candidate != default and bounds.problem(candidate) is None:
            return candidate
    raise AssertionError(f"no value in {bounds.describe()} other than {default}")


def non_default(key: str):
    default = getattr(DEFAULTS, key)
    if isinstance(default, bool):
        return not default
    if key in CHOICES:
        return next(c for c in CHOICES[key] if c != default)
    if key == "layers_per_block":
        return [1, 2]
    if key == "block_weights":
        return [2.0, 1.0, 1.0, 1.0]
    if key == "sigma_boundaries":
        return [0.1, 1.0, 10.0]
    if key == "sampling_sigma_max":
        return 10.0
    return number_in(DIFFUSION_BLOCKS_BOUNDS.get(key, Bounds(low=0, low_open=True)), default)


def section_with(key: str, enable: bool = True) -> DiffusionBlocks:
    section = DiffusionBlocks(enable=enable)
    for name, value in COMPANIONS.get(key, {}).items():
        setattr(section, name, value)
    setattr(section, key, non_default(key) if key != "enable" else enable)
    return section


def job_config(key: str, enable: bool = True):
    return SimpleNamespace(
        diffusion_blocks=section_with(key, enable),
        config_origins={("diffusion_blocks", key): "run.toml"},
    )


@pytest.mark.parametrize("key", KEYS)
def test_every_generated_value_is_valid_and_not_the_default(key):
    section = section_with(key)
    assert key == "enable" or getattr(section, key) != getattr(DEFAULTS, key)
    assert not check_diffusion_blocks(section), check_diffusion_blocks(section)


def companions_accepted(family, key, accepted) -> bool:
    return all(name in accepted for name in COMPANIONS.get(key, {}) if name != "num_blocks")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("key", KEYS)
def test_a_key_the_family_reads_is_accepted_any_other_refused(family, key):
    family = FAMILIES[family]
    config = job_config(key)
    if key in family.reads and companions_accepted(family, key, family.reads):
        check_keys(family, config)
    elif key not in family.reads:
        with pytest.raises(ConfigError) as raised:
            check_keys(family, config)
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith("run.toml: ")
        named = [key, *COMPANIONS.get(key, {})]  # a refused companion may come first
        assert any(f"[diffusion_blocks] {k} = " in message for k in named), message
        assert f"is not read by {family.name}" in message


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("key", KEYS)
def test_the_twin_accepts_its_own_and_its_block_wise_keys_refuses_the_rest(family, key, caplog):
    family = FAMILIES[family]
    config = job_config(key, enable=False)
    accepted = (*family.reads, *family.twin_reads)
    if key == "enable" or not companions_accepted(family, key, accepted):
        return
    if key in accepted:
        with caplog.at_level(logging.INFO):
            check_keys(family, config)
        notes = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
        if key in family.twin_reads:
            assert not any(key in note.split("ignores", 1)[1] for note in notes)
        else:
            assert len(notes) == 1 and key in notes[0] and family.name in notes[0]
    else:
        with pytest.raises(ConfigError, match=rf"{key} = .* is not read by {family.name}"):
            check_keys(family, config)


@pytest.mark.parametrize("family,key", [(f, k) for f, keys in KNOWN_LEAKS.items() for k in keys])
def test_known_leaks_are_refused(family, key):
    """The walk above trusts `reads`; these are the keys once accepted and never read."""
    with pytest.raises(ConfigError, match=rf"{key} = .* is not read by {family}"):
        check_keys(FAMILIES[family], job_config(key))


def test_stock_llama3_with_the_converter_refuses_an_image_key(write_toml):
    from diffusion_blocks.config.loader import parse_job_config
    from diffusion_blocks.registry import resolve_run_spec

    path = write_toml("stock.toml", (
        '[model]\nname = "llama3"\nflavor = "debugmodel"\nconverters = ["diffusion_blocks"]\n'
        '[diffusion_blocks]\ncfg_scale = 3.0\n'
    ))
    config = parse_job_config(["--job.config_file", str(path)])
    with pytest.raises(ConfigError, match=r"stock.toml: \[diffusion_blocks\] cfg_scale = 3.0 "
                                          r"is not read by dblocks_llama3"):
        resolve_run_spec(config)


# ---------------------------------------------------------------------------
# The run identity is the family's declared identity keys


def identity_of(family: str, enable: bool = True, **keys):
    from diffusion_blocks.components.run_identity import run_identity

    section = DiffusionBlocks(enable=enable, **keys)
    config = SimpleNamespace(
        diffusion_blocks=section, model=SimpleNamespace(name=family, flavor="debugmodel"),
    )
    partition = SimpleNamespace(num_blocks=section.num_blocks, layer_counts=(2,) * section.num_blocks)
    return run_identity(config, partition if enable else None, FAMILIES[family])


def test_each_family_identity_holds_the_keys_that_shape_its_function():
    lm, md4 = identity_of("dblocks_llama3"), identity_of("dblocks_md4")
    for key in ("sigma_max", "sigma_per_token", "target_embedding_scale", "adaln_cond_dim",
                "partition", "overlap", "layers_per_block"):
        assert f"diffusion_blocks.{key}" in lm
    for key in ("masking_schedule", "time_conditioning", "adaln_cond_dim", "overlap"):
        assert f"diffusion_blocks.{key}" in md4
    assert "diffusion_blocks.sigma_max" not in md4  # MD4 cuts t, not EDM's sigma
    assert "diffusion_blocks.cfg_scale" not in identity_of("dblocks_dit")  # a sampling knob
    twin = identity_of("dblocks_md4", enable=False)
    assert "diffusion_blocks.masking_schedule" in twin and "diffusion_blocks.overlap" not in twin


def test_an_identity_saved_before_a_key_joined_reads_it_as_its_default():
    from diffusion_blocks.components.run_identity import identity_mismatches

    ours = identity_of("dblocks_llama3")
    # keys that joined later: a scalar, a list (no class attribute on the dataclass), the family
    later = ("diffusion_blocks.adaln_cond_dim", "diffusion_blocks.sigma_boundaries", "model.family")
    old = {k: v for k, v in ours.items() if k not in later}
    old["diffusion_blocks.p_mean"] = ours["diffusion_blocks.p_mean"]
    assert identity_mismatches(old, ours) == []
    other = identity_of("dblocks_llama3", adaln_cond_dim=0)
    assert identity_mismatches(old, other) == [
        "[diffusion_blocks] adaln_cond_dim = 256 in the checkpoint, 0 here"]
    # a key the family no longer counts (an old MD4 file saved EDM's) is not compared
    md4 = identity_of("dblocks_md4")
    assert identity_mismatches({**md4, "diffusion_blocks.sigma_max": 40.0}, md4) == []
