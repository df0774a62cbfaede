"""How the E2E encoder runs on a sample of patches during training: activation checkpointing
(ResNet stem + blocks, or timm's own for other encoders), the BatchNorm buffers a
checkpointed step must restore, and the encoder's BatchNorm mode. Used by the E2E loop
and the benchmarks.

BatchNorm modes (`E2EConfig.bn`):
- "train" (default, the paper's): batch statistics over the bag's whole sample, running
  statistics updated. Checkpointing is exact but cannot cut the sample into chunks, so
  the stem's full-sample maps bound the memory of the backward pass.
- "frozen" (the GMA trainer's default): BatchNorm layers in eval mode, normalising with
  their running statistics (a fixed per-patch affine map; the affine weights still
  train). Each patch's feature then depends on that patch only, so with checkpointing
  the whole encoder runs chunk by chunk over the patches (`checkpoint_chunk` at a time)
  and only each chunk's input is kept: the peak is one chunk's activations plus the
  sample's inputs and features, no longer the stem's maps of the whole sample. Outputs
  and gradients are those of the unchunked frozen-BatchNorm step (tested in float64);
  they differ from "train" mode's.
"""

from __future__ import annotations

import torch

from bench.common.errors import ConfigError

BN_MODES = ("train", "frozen")


def checkpoint_segments(encoder: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The pieces activation checkpointing cuts a ResNet `PatchEncoder` into: the stem, then every
    residual block of the remaining stages (None for other encoders)."""
    import torch

    backbone = getattr(encoder, "backbone", None)
    names = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if backbone is None or getattr(encoder, "pooling", None) != "avg" or not all(hasattr(backbone, n) for n in names):
        return None
    segments: list[torch.nn.Module] = [torch.nn.Sequential(backbone.conv1, backbone.bn1, backbone.act1,
                                                           backbone.maxpool)]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(backbone, stage)
        if not isinstance(layer, torch.nn.Identity):  # truncated stages are identities
            segments.extend(layer.children() if isinstance(layer, torch.nn.Sequential) else [layer])
    return segments


def encoder_forward(encoder: torch.nn.Module, x: torch.Tensor, checkpointing: bool, *, bn: str = "train",
                    chunk: int | None = None) -> torch.Tensor:
    """(n, 3, S, S) -> (n, D), with activation checkpointing when asked.

    bn="train": ResNets are checkpointed at the stem and every block over the whole
    sample (the stem's 112 px maps are the largest activations); other timm encoders
    use timm's own `set_grad_checkpointing`. bn="frozen" (BatchNorm layers already in
    eval mode, `set_encoder_mode`): the whole encoder is checkpointed per chunk of
    `chunk` patches (default: all of them), any architecture. The numbers are those of
    `encoder(x)`.

    Raises:
        ConfigError: an unknown `bn`, a chunk below 1 patch, or an encoder without checkpointing.
    """
    if bn not in BN_MODES:
        raise ConfigError(f"E2E bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    if chunk is not None:
        check_chunk(chunk)
    if not checkpointing or not torch_grad_enabled():
        return encoder(x)
    from torch.utils.checkpoint import checkpoint

    if bn == "frozen":
        step = x.shape[0] if chunk is None else chunk
        # per chunk only its input is kept; the backward pass recomputes one chunk at a time
        outs = [checkpoint(encoder, part, use_reentrant=False) for part in x.split(max(1, step))]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
    segments = checkpoint_segments(encoder)
    if segments is None:
        backbone = getattr(encoder, "backbone", None)
        if backbone is None or not hasattr(backbone, "set_grad_checkpointing"):
            raise ConfigError(f"encoder {getattr(encoder, 'encoder_name', '?')!r} does not support activation "
                              "checkpointing; set checkpointing = false")
        backbone.set_grad_checkpointing(True)
        return encoder(x)
    h = x
    for seg in segments:
        h = checkpoint(seg, h, use_reentrant=False)  # keeps only the segment's input
    return h.mean(dim=(2, 3))  # (n, C, h, w) -> (n, C): the encoder's "avg" pooling


def check_chunk(chunk: object) -> int:
    """A checkpoint chunk size: an integer >= 1 patch (the smallest that works)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"E2E checkpoint_chunk must be a whole number of patches >= 1, got {chunk!r}: a chunk "
                          "holds at least one patch (1 is the smallest that works, and the least memory)")
    return chunk


def set_encoder_mode(encoder: torch.nn.Module, bn: str) -> None:
    """Train mode; with bn="frozen" every BatchNorm layer stays in eval mode (running statistics,
    not updated; affine weights still train)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if bn not in BN_MODES:
        raise ConfigError(f"E2E bn must be one of {', '.join(map(repr, BN_MODES))}, got {bn!r}")
    encoder.train()
    if bn == "frozen":
        for m in encoder.modules():
            if isinstance(m, _BatchNorm):
                m.eval()


def torch_grad_enabled() -> bool:
    import torch

    return torch.is_grad_enabled()


def batchnorm_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    """Running-statistics buffers of every BatchNorm in `module`."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out = []
    for m in module.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            out.extend(b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None)
    return out


__all__ = ["encoder_forward", "checkpoint_segments", "batchnorm_buffers", "set_encoder_mode", "check_chunk",
           "BN_MODES"]
