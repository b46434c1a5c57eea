"""The memory engine: a DiT loaded the way a memory plan says, ready to run a step.

Resident blocks (and the small non-block layers) are streamed from the file straight to the
compute device, so host RAM never holds them. Swapped blocks are streamed to the host and
handed to a :class:`~.offload.BlockSwapper`, which pins them and prefetches them into reused
device slots while earlier blocks compute. Text / image embedding layers can stay on the
host too and visit the device only for their call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..wan.checkpoint import Checkpoint
from ..wan.detect import detect_dit_config
from ..wan.denoise import DiTCall
from ..wan.model import WanModel, WanState
from . import loading
from .offload import Backend, BlockSwapper, OnCallOffload, SwapStats, offload_on_call

_EMBEDDINGS = ("text_embedding", "img_emb")


@dataclass(frozen=True)
class SwapSettings:
    """How many of the DiT's blocks live off the device, and how they come back."""

    blocks_to_swap: int = 0
    prefetch: int = 1
    pin_memory: bool = True
    offload_embeddings: bool = False


@dataclass
class PreparedDiT:
    """A loaded DiT with its swap machinery; ``run_blocks`` is the denoiser's hook."""

    model: WanModel
    resident: int
    swapper: BlockSwapper | None = None
    offloads: list[OnCallOffload] = field(default_factory=list)

    def run_blocks(self, state: WanState, call: DiTCall | None = None) -> WanState:
        if self.swapper is not None:
            return self.swapper.run_blocks(state)
        return self.model.run_blocks(state)

    def swap_stats(self) -> SwapStats | None:
        return self.swapper.telemetry() if self.swapper is not None else None

    def close(self) -> None:
        """Release pinned memory and device slots (also after Cancel or an error)."""
        if self.swapper is not None:
            self.swapper.close()
            self.swapper = None
        for offload in self.offloads:
            offload.remove()
        self.offloads.clear()


def prepare_dit(ckpt: Checkpoint, device: torch.device | str | Backend, settings: SwapSettings = SwapSettings(),
                dtype: torch.dtype = torch.bfloat16, weight_format: str = "auto",
                attention: str = "auto") -> PreparedDiT:
    """Load the DiT in ``ckpt`` with its last ``settings.blocks_to_swap`` blocks on the host.

    ``device`` is the compute device, or an offload ``Backend`` (the tests' recording
    stand-in runs the same swap schedule on the CPU).
    """
    backend = device if not isinstance(device, (torch.device, str)) else None
    device = torch.device("cpu") if backend is not None else torch.device(device)
    layers = detect_dit_config(ckpt.shapes).num_layers
    swap = settings.blocks_to_swap
    if not 0 <= swap <= layers:
        raise ValueError(f"blocks_to_swap={swap}: this model has {layers} blocks")
    resident = layers - swap

    def place(name: str) -> torch.device | str:
        parts = name.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= resident:
            return "cpu"
        if settings.offload_embeddings and parts[0] in _EMBEDDINGS:
            return "cpu"
        return device

    model = loading.load_dit(ckpt, dtype=dtype, weight_format=weight_format, device=place, attention=attention)
    if backend is None and device.type == "cpu":
        return PreparedDiT(model, resident)  # nothing to swap between: host and device are one
    return attach_swap(model, resident, backend or device, settings)


def attach_swap(model: WanModel, resident: int, device: torch.device | str | Backend,
                settings: SwapSettings) -> PreparedDiT:
    """Wrap a model whose first ``resident`` blocks are already on the device and whose other
    blocks (and embeddings, if ``settings.offload_embeddings``) are on the host."""
    prepared = PreparedDiT(model, resident)
    try:
        if resident < len(model.blocks):
            # The resident blocks were loaded straight to the device (host RAM never holds
            # them); the swapper runs them in place while the first swapped copies fly.
            prepared.swapper = BlockSwapper(model.blocks, device, resident=resident,
                                            prefetch=settings.prefetch, pin_memory=settings.pin_memory,
                                            resident_placed=True)
        if settings.offload_embeddings:
            prepared.offloads = [offload_on_call(getattr(model, name), device, settings.pin_memory)
                                 for name in _EMBEDDINGS if hasattr(model, name)]
    except BaseException:
        prepared.close()
        raise
    return prepared
