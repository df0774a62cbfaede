"""Pretrained slide encoders as aggregators: `two-stage/<patch encoder>/<slide encoder>`.

A slide encoder (baselines/slide: FEATHER, CHIEF, PRISM, ...) turns a bag of patch features into one
slide embedding; `SlideEncoderMIL` puts a linear head on that embedding, so the two-stage trainer,
its records and the leaderboards run it like any other aggregator. Two modes, on the same splits:

- ``probe`` (aggregator ``<name>``): the slide encoder is frozen (no gradients, kept in eval mode
  so its dropout is off while the head trains); only the linear head learns: the usual linear probe
  of a slide foundation model.
- ``finetune`` (aggregator ``<name>-ft``): encoder and head train together. ``checkpoint_layers``
  (default true) recomputes the repeated layers' activations in backward (GigaPath, PRISM, TITAN):
  same gradients, ~1 extra forward of time, a fraction of the memory (BENCHMARKS.md, slide encoders).

``init = "published"`` loads the authors' weights (``weights`` = a local file, else the Hub
snapshot of the registry's source, honouring HF_HUB_OFFLINE); the slide encoder then only makes sense
on its own patch encoder's features, and a feature size other than the one it was trained on is an
error that names it (the suite checks the patch encoder by name: `check_pairing`). ``init =
"random"`` builds the architecture with seeded random weights at the bag's feature size (tests,
synthetic demos: nothing is downloaded). ``config = "tiny"`` is the small test instance.

Patch positions: encoders with `uses_coords` (TITAN's 2D ALiBi, GigaPath's sin-cos grid) get the
bag's grid positions, (column, row) = level-0 pixel coordinates / the patch's level-0 side, which the
two-stage trainer reads from the feature files (`BagFeatures.grid`).

Attention for heatmaps: the encoder's own per-patch attention where it has one (FEATHER, CHIEF:
their attention pooling; PRISM: the image latent's last cross-attention), else uniform.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_choice
from bench.common.errors import ConfigError

MODES = ("probe", "finetune")
INITS = ("random", "published")


class SlideEncoderMIL(MILAggregator):
    """A registered slide encoder + a linear head on its slide embedding."""

    permutation_invariant = False  # set per encoder at registration (True where it ignores positions)

    def __init__(self, in_dim: int, n_outputs: int, encoder: str = "feather", mode: str = "probe",
                 init: str = "random", config: str = "published", weights: str | None = None,
                 checkpoint_layers: bool = True) -> None:
        from baselines.encoders_slide import SLIDE_ENCODERS
        from baselines.slide import build_slide_arch

        spec = SLIDE_ENCODERS.get(encoder)
        mode = check_choice("mode", mode, MODES)
        init = check_choice("init", init, INITS)
        if init == "published":
            if config != "published":
                raise ConfigError(f"slide encoder {encoder!r}: init='published' loads the released weights, which "
                                  f"need config='published' (got config={config!r})")
            if in_dim != spec.patch_dim:
                raise ConfigError(
                    f"slide encoder {encoder!r} takes {spec.patch_dim}-d features of patch encoder "
                    f"{spec.patch_encoder!r}; these bags have {in_dim}-d features. Use "
                    f"two-stage/{spec.patch_encoder}/{encoder}, or init='random' to train the architecture from scratch")
            net = build_slide_arch(encoder, config="published")
        else:
            net = build_slide_arch(encoder, config=config, in_dim=in_dim)
        super().__init__(in_dim, n_outputs, hidden_dim=net.embed_dim)
        self.uses_coords = bool(net.uses_coords)  # TITAN, GigaPath: the trainer then passes the patch grid
        self.mode, self.init = mode, init
        self.encoder_name = encoder
        self.encoder = net
        if self.init == "published":
            self.encoder.load_published(load_slide_weights(spec, weights))
        self.head = nn.Linear(net.embed_dim, n_outputs)
        if self.mode == "probe":
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        elif not isinstance(checkpoint_layers, bool):
            raise ConfigError(f"slide encoder {encoder!r}: checkpoint_layers must be true or false, "
                              f"got {checkpoint_layers!r}")
        else:
            self.encoder.set_checkpointing(checkpoint_layers)

    def train(self, mode: bool = True) -> SlideEncoderMIL:
        super().train(mode)
        if self.mode == "probe":
            self.encoder.eval()  # a frozen encoder never trains: no dropout, no batch statistics
        return self

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None,
                  coords: torch.Tensor | None = None) -> MILOutput:
        if self.mode == "probe":
            with torch.no_grad():
                z = self.encoder(x, coords, mask)  # (B, E)
        else:
            z = self.encoder(x, coords, mask)
        attention = self.encoder.attention()
        if attention is None or tuple(attention.shape) != tuple(x.shape[:2]):
            valid = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
            attention = valid / valid.sum(dim=1, keepdim=True)  # uniform over the valid patches
        return MILOutput(logits=self.head(z), attention=attention.detach() if self.mode == "probe" else attention)


def load_slide_weights(spec: Any, weights: str | None) -> Mapping[str, torch.Tensor]:
    """The authors' state dict: from `weights` (a file), else the Hub snapshot of `spec.source`."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"slide encoder {spec.name!r}: weights file {path} does not exist")
        return _read_state_dict(path)
    if not spec.source.startswith("hf-hub:"):
        raise ConfigError(f"slide encoder {spec.name!r}: its weights are not on the Hub ({spec.source}); download "
                          f"them from {spec.reference or spec.source} and pass aggregator_params "
                          f"{{ weights = \"PATH\" }}")
    repo = spec.source.split(":", 1)[1]
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, allow_patterns=["*.safetensors", "*.bin", "*.pth", "*.pt"]))
    except Exception as exc:  # offline, gated, missing: one message that says what to do
        gated = f" It is gated ({spec.licence}): accept its terms on {spec.reference}, then `hf auth login`." \
            if spec.gated else ""
        raise ConfigError(
            f"slide encoder {spec.name!r}: cannot get its weights from the Hub repo {repo} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).{gated} Or download them "
            f"yourself and pass aggregator_params {{ weights = \"PATH\" }}") from None
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if len(files) != 1:
        raise ConfigError(f"slide encoder {spec.name!r}: expected one weights file in {folder}, found "
                          f"{[p.name for p in files]}; pass aggregator_params {{ weights = \"PATH\" }}")
    return _read_state_dict(files[0])


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


__all__ = ["SlideEncoderMIL", "load_slide_weights", "MODES", "INITS"]
