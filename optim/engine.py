"""The memory engine: a DiT loaded the way a memory plan says, ready to run a step.

Resident blocks (and the small non-block layers) are streamed from the file straight to the
compute device, so host RAM never holds them. Swapped blocks are streamed to the host and
handed to a :class:`~.offload.BlockSwapper`, which pins them and prefetches them into reused
device slots while earlier blocks compute. Text / image embedding layers can stay on the
host too and visit the device only for their call.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..wan.checkpoint import Checkpoint
from ..wan.detect import detect_dit_config
from ..wan.denoise import DiTCall
from ..wan.model import WanModel, WanState
from . import gguf, loading, lora
from .offload import Backend, BlockSwapper, OnCallOffload, SwapStats, offload_on_call

log = logging.getLogger("WanFit")

_EMBEDDINGS = ("text_embedding", "img_emb")


@dataclass(frozen=True)
class SwapSettings:
    """How many of the DiT's blocks live off the device, and how they come back."""

    blocks_to_swap: int = 0
    prefetch: int = 1
    pin_memory: bool = True
    offload_embeddings: bool = False


@dataclass
class LoraState:
    """The LoRAs a loaded DiT carries: low-rank deltas merged into its weights when they were
    read, the fixed (always merged) deltas of the current set, and the unmerged part."""

    merged: list[lora.AppliedLora] = field(default_factory=list)
    fixed: list[lora.AppliedLora] = field(default_factory=list)
    unmerged: lora.UnmergedLora | None = None
    reads: list[str] = field(default_factory=list)  # checkpoint keys re-read by the last change


@dataclass
class PreparedDiT:
    """A loaded DiT with its swap machinery; ``run_blocks`` is the denoiser's hook."""

    model: WanModel
    resident: int
    swapper: BlockSwapper | None = None
    offloads: list[OnCallOffload] = field(default_factory=list)
    loras: LoraState = field(default_factory=LoraState)
    # how it was loaded, so LoRAs can change without reading the blocks again
    ckpt: Checkpoint | None = None
    device: torch.device | str | Backend | None = None
    settings: SwapSettings = SwapSettings()
    dtype: torch.dtype = torch.bfloat16
    weight_format: str = "auto"

    def run_blocks(self, state: WanState, call: DiTCall | None = None) -> WanState:
        if self.swapper is not None:
            return self.swapper.run_blocks(state)
        return self.model.run_blocks(state)

    def swap_stats(self) -> SwapStats | None:
        return self.swapper.telemetry() if self.swapper is not None else None

    def close(self) -> None:
        """Release pinned memory and device slots (also after Cancel or an error)."""
        self._detach_swap()

    def _detach_swap(self) -> None:
        if self.swapper is not None:
            self.swapper.close()
            self.swapper = None
        for offload in self.offloads:
            offload.remove()
        self.offloads.clear()

    def set_loras(self, wanted: Sequence[lora.AppliedLora]) -> None:
        """Make the held model act as loaded with ``wanted`` without reading its blocks again.

        The low-rank deltas merged at load stay; what differs from them runs unmerged (hooks
        on the Linear layers, factors placed with each layer). The fixed deltas (norms,
        biases, modulation, the float32 embedding / head layers) are redone on the few
        tensors they touch, read again from the checkpoint. Block swap is detached and
        attached again around the change, so its pinned copies pick up the new layout.
        """
        if self.ckpt is None:
            raise RuntimeError("this DiT was not loaded by prepare_dit: its LoRAs cannot change")
        state = self.loras
        self._detach_swap()
        try:
            if state.unmerged is not None:
                state.unmerged.remove()
                state.unmerged = None
            wanted = list(wanted)
            old = lora.patches_of(state.fixed, lora.is_fixed)
            new = lora.patches_of(wanted, lora.is_fixed)
            names = sorted(set(old) | set(new))
            if names:
                merge_dtype = loading.DTYPES.get(self.weight_format, self.dtype)
                transform = lambda t, keys: lora.MergedTensors(t, new, merge_dtype, keys)  # noqa: E731
                if isinstance(self.ckpt, gguf.GGUFCheckpoint):
                    gguf.reload_dit_tensors_gguf(self.model, self.ckpt, names, merge_dtype, transform)
                else:
                    loading.reload_dit_tensors(self.model, self.ckpt, names, self.dtype, self.weight_format,
                                               transform=transform)
            state.fixed, state.reads = wanted, names
            extra = lora.difference(wanted, state.merged)
            if extra:
                state.unmerged = lora.attach_unmerged(self.model, extra, self.dtype)
        finally:
            if self.device is not None:
                self._attach_swap()

    def _attach_swap(self) -> None:
        device = self.device
        if isinstance(device, (torch.device, str)) and torch.device(device).type == "cpu":
            return
        attached = attach_swap(self.model, self.resident, device, self.settings)
        self.swapper, self.offloads = attached.swapper, attached.offloads


def _load_dit(ckpt: Checkpoint | gguf.GGUFCheckpoint, dtype: torch.dtype, weight_format: str,
              place: loading.Placement, attention: str, transform: loading.Transform | None) -> WanModel:
    """``loading.load_dit``, or for a GGUF file ``gguf.load_dit_gguf``: "auto" keeps its block
    weights quantised (dequantised per matmul), bf16 / fp16 / fp32 dequantise them at load."""
    if not isinstance(ckpt, gguf.GGUFCheckpoint):
        return loading.load_dit(ckpt, dtype=dtype, weight_format=weight_format, device=place, attention=attention,
                                transform=transform)
    if weight_format != "auto" and weight_format not in loading.DTYPES:
        raise ValueError(f"{ckpt.name} is a GGUF model ({ckpt.quant_label()}): weight_dtype must be auto (keep it "
                         f"quantised) or bf16 / fp16 / fp32, not {weight_format}")
    return gguf.load_dit_gguf(ckpt, loading.DTYPES.get(weight_format, dtype), place, attention,
                              keep_quantized=weight_format == "auto", transform=transform)


def prepare_dit(ckpt: Checkpoint | gguf.GGUFCheckpoint, device: torch.device | str | Backend, settings: SwapSettings = SwapSettings(),
                dtype: torch.dtype = torch.bfloat16, weight_format: str = "auto",
                attention: str = "auto", loras: Sequence[tuple[lora.AppliedLora, str]] = ()) -> PreparedDiT:
    """Load the DiT in ``ckpt`` with its last ``settings.blocks_to_swap`` blocks on the host.

    ``device`` is the compute device, or an offload ``Backend`` (the tests' recording
    stand-in runs the same swap schedule on the CPU). ``loras``: (LoRA, "merged" or
    "unmerged") pairs; merged ones are added to the weights as they stream from the file
    (fp8: dequantised, patched, requantised), unmerged ones hook the Linear layers and
    their factors go where each layer goes (resident blocks: the device; swapped: the host).
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

    applied = [a for a, _ in loras]
    merged = [a for a, mode in loras if mode == "merged"]
    unmerged = [a for a, mode in loras if mode == "unmerged"]
    if any(mode not in ("merged", "unmerged") for _, mode in loras):
        raise ValueError(f"LoRA modes must be merged or unmerged here, got {[m for _, m in loras]}")
    merged_ids = {id(a) for a in merged}
    patches = lora.patches_of(applied, lambda a, d: id(a) in merged_ids or lora.is_fixed(a, d))
    merge_dtype = loading.DTYPES.get(weight_format, dtype)  # what load_dit casts to
    model = _load_dit(ckpt, dtype, weight_format, place, attention,
                      (lambda t, keys: lora.MergedTensors(t, patches, merge_dtype, keys)) if patches else None)
    state = LoraState(merged=merged, fixed=applied)
    if unmerged:
        state.unmerged = lora.attach_unmerged(model, unmerged, dtype)
    where = backend or device
    if backend is None and device.type == "cpu":  # nothing to swap between: host and device are one
        return PreparedDiT(model, resident, loras=state, ckpt=ckpt, device=where, settings=settings, dtype=dtype,
                           weight_format=weight_format)
    prepared = attach_swap(model, resident, where, settings)
    prepared.loras, prepared.ckpt, prepared.device = state, ckpt, where
    prepared.dtype, prepared.weight_format = dtype, weight_format
    return prepared


def attach_swap(model: WanModel, resident: int, device: torch.device | str | Backend,
                settings: SwapSettings) -> PreparedDiT:
    """Wrap a model whose first ``resident`` blocks are already on the device and whose other
    blocks (and embeddings, if ``settings.offload_embeddings``) are on the host."""
    prepared = PreparedDiT(model, resident, settings=settings)
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
