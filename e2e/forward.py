"""How the E2E encoder runs on a sample of patches during training: activation checkpointing
(ResNet stem + blocks, or timm's own for other encoders) and the BatchNorm buffers a
checkpointed step must restore. Used by the E2E loop and the benchmarks.
"""

from __future__ import annotations

import torch

from bench.common.errors import ConfigError


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


def encoder_forward(encoder: torch.nn.Module, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """(n, 3, S, S) -> (n, D), with activation checkpointing when asked.

    ResNets are checkpointed at the stem and every block over the whole sample (the
    stem's 112 px maps are the largest activations); other timm encoders use timm's own
    `set_grad_checkpointing`. The numbers are those of `encoder(x)`.
    """
    if not checkpointing or not torch_grad_enabled():
        return encoder(x)
    from torch.utils.checkpoint import checkpoint

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


__all__ = ["encoder_forward", "checkpoint_segments", "batchnorm_buffers"]
