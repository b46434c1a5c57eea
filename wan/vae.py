"""A Wan VAE from its config or from a state dict's shapes; the one module that knows both versions.

``vae_common`` holds what the two VAEs share, ``vae21`` / ``vae22`` lay out their stages;
this module sits above all three, so imports run one way (vae -> vae21, vae22 -> vae_common).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .vae21 import WanVAE21
from .vae22 import WanVAE22
from .vae_common import VAEConfig, Wan21VAEConfig, Wan22VAEConfig, WanVAE


def build_vae(config: VAEConfig) -> WanVAE:
    """The model for a config (weights uninitialised as torch leaves them; build under
    ``torch.device('meta')`` and ``load_state_dict(..., assign=True)`` to load without copies)."""
    return (WanVAE21 if isinstance(config, Wan21VAEConfig) else WanVAE22)(config)


# ----------------------------------------------------------------------------- detection

_ANCHOR = "encoder.conv1.weight"
_REQUIRED = (_ANCHOR, "decoder.conv1.weight", "conv1.weight", "conv2.weight")
_TOP_LEVEL = ("encoder", "decoder", "conv1", "conv2")


def find_vae_prefix(keys: Iterable[str]) -> str:
    """The prefix (``''``, ``'vae.'``, ``'first_stage_model.'``, ...) under which a Wan VAE's keys
    sit; ValueError if the keys are not a Wan VAE in the official layout."""
    keys = set(keys)
    for key in sorted(keys, key=len):
        prefix = key[: -len(_ANCHOR)]
        if key.endswith(_ANCHOR) and (prefix == "" or prefix.endswith(".")) \
                and all(prefix + k in keys for k in _REQUIRED):
            return prefix
    sample = ", ".join(sorted(keys)[:4]) or "no keys"
    hint = ""
    if any(k.endswith("mid_block.resnets.0.norm1.gamma") for k in keys):
        hint = (" These look like diffusers names (encoder.conv_in.*); use the original-layout "
                "file instead, e.g. Comfy-Org's wan_2.1_vae.safetensors / wan2.2_vae.safetensors.")
    raise ValueError(f"not a Wan VAE: expected the official key layout ({', '.join(_REQUIRED)}, "
                     f"optionally under a prefix such as 'vae.'), found {sample}, ...{hint}")


def _level_stages(shapes: Mapping[str, tuple], base: str) -> list[tuple[int, bool | None]]:
    """(output width, temporal flag or None if no resample) of each flat stage under ``base``."""
    stages, k = [], 0
    while any(key.startswith(f"{base}.{k}.") for key in shapes):
        if f"{base}.{k}.residual.2.weight" in shapes:
            stages.append((shapes[f"{base}.{k}.residual.2.weight"][0], None))
        elif f"{base}.{k}.resample.1.weight" in shapes:
            stages.append((0, f"{base}.{k}.time_conv.weight" in shapes))
        k += 1
    return stages


def detect_vae_config(shapes: Mapping[str, tuple]) -> VAEConfig:
    """Tell the Wan VAE version and architecture from a state dict's tensor shapes.

    Works for the real models and any scaled-down one; raises ValueError naming what was
    expected when ``shapes`` is not a Wan 2.1 / 2.2 VAE in the official key layout.
    """
    prefix = find_vae_prefix(shapes)
    s = {k[len(prefix):]: tuple(v) for k, v in shapes.items()
         if k.startswith(prefix) and k[len(prefix):].split(".")[0] in _TOP_LEVEL}
    dim, in_ch = s[_ANCHOR][:2]
    z_dim = s["conv2.weight"][0]
    levels: list[list[tuple[int, bool | None]]] = []
    if in_ch == 3:  # 2.1: one flat list, each level = residual blocks then a Resample
        stages, level = _level_stages(s, "encoder.downsamples"), []
        for width, temporal in stages:
            level.append((width, temporal))
            if temporal is not None:
                levels.append(level)
                level = []
        levels.append(level)
    elif in_ch == 12:  # 2.2: one Down_ResidualBlock per level
        i = 0
        while f"encoder.downsamples.{i}.downsamples.0.residual.2.weight" in s:
            levels.append(_level_stages(s, f"encoder.downsamples.{i}.downsamples"))
            i += 1
    else:
        raise ValueError(f"not a Wan 2.1 / 2.2 VAE: encoder.conv1 takes {in_ch} channels, "
                         "expected 3 (Wan 2.1: RGB) or 12 (Wan 2.2: 2x2-patched RGB)")
    try:
        num_res_blocks = sum(t is None for _, t in levels[0])
        kwargs = dict(dim=dim, z_dim=z_dim, num_res_blocks=num_res_blocks,
                      dim_mult=tuple(lv[num_res_blocks - 1][0] // dim for lv in levels),
                      temperal_downsample=tuple(bool(lv[-1][1]) for lv in levels[:-1]))
        if in_ch == 3:
            config: VAEConfig = Wan21VAEConfig(**kwargs)
        else:
            dec_dim = s["decoder.conv1.weight"][0] // kwargs["dim_mult"][-1]
            config = Wan22VAEConfig(**kwargs, dec_dim=dec_dim)
    except (IndexError, ValueError) as err:
        raise ValueError(f"not a Wan VAE with a consistent layout: {err}") from err
    _verify(config, s)
    return config


def _verify(config: VAEConfig, shapes: Mapping[str, tuple]) -> None:
    """Build the detected architecture on the meta device and check every key and shape."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_vae(config).state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        what = f"a Wan {config.version} VAE (dim {config.dim}, z_dim {config.z_dim})"
        problems = [f"{kind}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                    for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            problems.append(f"tensor {wrong[0]} has shape {list(shapes[wrong[0]])}, but it needs "
                            f"{list(expected[wrong[0]])}{more}")
        raise ValueError(f"keys look like {what} but do not match it: {'; '.join(problems)}")
