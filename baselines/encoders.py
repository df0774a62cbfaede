"""Patch encoders: a registry of frozen specs, each built through timm.

TRIDENT's factory, without its import-time network probe: one name -> one
`EncoderSpec` -> `spec.build()` -> `LoadedEncoder(model, transform, precision,
weights_id, spec)`. The same spec gives the end-to-end trainer a trainable
module (`spec.create_model()`), so both paradigms use identical encoders.

    >>> spec = get_encoder("resnet18-trunc")
    >>> enc = spec.build(random_init=True, seed=0)             # doctest: +SKIP
    >>> x = enc.transform(patches_uint8)                        # (B, H, W, 3) uint8 -> (B, 3, 224, 224)
    >>> enc.model(x).shape                                      # doctest: +SKIP
    torch.Size([B, 256])

Weights come from an explicit file, the local HF cache or the Hub, in that order
(see `baselines.weights`); random initialisation only on request.

Nothing runs at import: specs are plain data; timm is imported when a model is built.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from bench.common.errors import ConfigError, DataError, MissingFileError
from bench.data.layout import check_name
from bench.common.registry import Registry

from baselines.weights import (
    RANDOM_INIT,
    HUB_WEIGHT_FILES,
    WeightsSource,
    WeightsUnavailable,
    hub_source,
    load_into,
    load_state_dict_file,
    local_source,
    random_source,
    snapshot_weights_file,
)

if TYPE_CHECKING:
    import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLINGS = ("avg", "cls", "mean", "cls+mean", "model")
PRECISIONS = ("fp32", "bf16", "fp16")
INTERPOLATIONS = ("bilinear", "bicubic")
WEIGHTS_FORMATS = ("timm", "transformers", "torch-hub", "harness", "custom")
# Formats whose published checkpoint is converted to the timm architecture's keys (baselines.convert).
CONVERTED_FORMATS = ("transformers", "torch-hub")
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
_HUB_ID = re.compile(r"^hf[-_]hub:([A-Za-z0-9][\w.-]*/[\w.-]+)$")
# Layer classes a spec may name in its timm kwargs (TOML holds strings). A fixed list:
# nothing from a config file is ever imported by name.
_NAMED_LAYERS = {
    "timm.layers.SwiGLUPacked": ("timm.layers", "SwiGLUPacked"),
    "timm.layers.SwiGLU": ("timm.layers", "SwiGLU"),
    "timm.layers.GluMlp": ("timm.layers", "GluMlp"),
    "timm.layers.Mlp": ("timm.layers", "Mlp"),
    "torch.nn.SiLU": ("torch.nn", "SiLU"),
    "torch.nn.GELU": ("torch.nn", "GELU"),
    "torch.nn.LayerNorm": ("torch.nn", "LayerNorm"),
}


@dataclass(frozen=True)
class EncoderSpec:
    """How to build one patch encoder (weights are looked up separately, see `baselines.weights`).

    Attributes:
        name: registry name; also the features folder name.
        source: timm model name with its weights tag (`resnet50.tv_in1k`) or `hf-hub:<org>/<repo>`.
        embed_dim: size of the embedding `forward` returns (checked when the model is built).
        input_size: side of the square image the model sees.
        mean, std: per-channel normalisation of [0, 1] RGB.
        precision: preferred autocast precision on CUDA (CPU always runs fp32).
        gated: the Hub weights need an accepted licence and a token.
        pooling: "avg" (spatial mean of a CNN map), "cls" (class token), "mean" (mean of patch
            tokens, register tokens excluded), "cls+mean" (both, concatenated), "model" (the
            timm model's own pooled output with its head removed).
        timm_kwargs: passed to `timm.create_model` on every path (the model card's arguments).
        architecture: timm architecture of a Hub model, to build it without the Hub's
            config.json (explicit weights file, random init).
        architecture_kwargs: the Hub config's `model_args`, used with `architecture`.
        truncate_after: ResNet stage after which the network is cut ("layer3": CLAM's 1024-d ResNet-50).
        interpolation: resize filter when patches are not `input_size`.
        resize_to: resize patches to this side, then centre-crop `input_size` (None: resize to `input_size`).
        revision: Hub revision (branch, tag or commit); None = main.
        weights: default local weights file or snapshot folder (from a suite file).
        reference: where the constructor arguments and normalisation come from (the model card).
        magnification: the magnification the encoder was trained at, as its card states it.
        licence: the weights' licence (gated ones also need the terms accepted on the model page).
        source_note: which facts were looked up where.
        weights_format: "timm" (a timm state dict / timm Hub repo); "transformers" (a Hugging Face
            ViTModel/Dinov2Model checkpoint) or "torch-hub" (an original DINOv2 module's state dict): converted
            to `architecture`'s keys by `baselines.convert` and loaded strictly (a transformers config.json beside
            the weights is checked against the architecture); "harness": the authors' own module's state dict,
            mapped onto a harness architecture by its converter (`HARNESS_CONVERTERS`: CONCH v1.5's vision tower,
            CTransPath, MUSK) and loaded strictly; "custom": a checkpoint no converter knows, so it is not loaded
            (architecture only: meta check, --random-init).
        hub_filename: a weights file inside a Hub repo that is not a timm repo (loaded into `architecture`);
            may name a sub-folder ("fm_v1/ctranspath/CHIEF_CTransPath.pth").
        hub_repo_type: "model" (default) or "dataset": the kind of Hub repo that holds the weights.
    """

    name: str
    source: str
    embed_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: str = "fp32"
    gated: bool = False
    pooling: str = "model"
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    architecture: str | None = None
    architecture_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    truncate_after: str | None = None
    interpolation: str = "bilinear"
    resize_to: int | None = None
    revision: str | None = None
    weights: str | None = None
    reference: str = ""
    magnification: str = ""
    licence: str = ""
    source_note: str = ""
    weights_format: str = "timm"
    hub_filename: str | None = None
    hub_repo_type: str = "model"

    def __post_init__(self) -> None:
        check_name("encoder", self.name)
        what = f"encoder {self.name!r}"
        if not isinstance(self.source, str) or not self.source:
            raise ConfigError(f"{what}: source must be a timm model name or 'hf-hub:<org>/<repo>', got {self.source!r}")
        if self.source.startswith(("hf-hub:", "hf_hub:")) and not _HUB_ID.match(self.source):
            raise ConfigError(f"{what}: source {self.source!r} is not of the form 'hf-hub:<org>/<repo>'")
        for key in ("embed_dim", "input_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{what}: {key} must be a positive integer, got {value!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            ok = isinstance(value, (tuple, list)) and len(value) == 3 and all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in value)
            if not ok or (key == "std" and min(value) <= 0):
                bound = " > 0" if key == "std" else ""
                raise ConfigError(f"{what}: {key} must be 3 finite numbers{bound}, got {value!r}")
            object.__setattr__(self, key, tuple(float(v) for v in value))
        _check_choice(what, "precision", self.precision, PRECISIONS)
        _check_choice(what, "pooling", self.pooling, POOLINGS)
        _check_choice(what, "interpolation", self.interpolation, INTERPOLATIONS)
        _check_choice(what, "weights_format", self.weights_format, WEIGHTS_FORMATS)
        _check_choice(what, "hub_repo_type", self.hub_repo_type, ("model", "dataset"))
        if self.weights_format == "harness" and self.architecture not in HARNESS_CONVERTERS:
            raise ConfigError(f"{what}: weights_format 'harness' needs an architecture with a converter, one of "
                              f"{sorted(HARNESS_CONVERTERS)}; got architecture {self.architecture!r}")
        if self.hub_repo_type == "dataset" and self.hub_filename is None:
            raise ConfigError(f"{what}: hub_repo_type 'dataset' needs hub_filename (the weights file in the dataset)")
        if self.hub_filename is not None and (not self.is_hub or self.architecture is None):
            raise ConfigError(f"{what}: hub_filename needs an 'hf-hub:' source and an architecture to load it into")
        if not isinstance(self.gated, bool):
            raise ConfigError(f"{what}: gated must be true or false, got {self.gated!r}")
        if self.truncate_after is not None:
            _check_choice(what, "truncate_after", self.truncate_after, _RESNET_STAGES[:-1])
        if self.resize_to is not None and (not isinstance(self.resize_to, int) or self.resize_to < self.input_size):
            raise ConfigError(f"{what}: resize_to must be an integer >= input_size ({self.input_size}), "
                              f"got {self.resize_to!r}")
        for key in ("timm_kwargs", "architecture_kwargs"):
            kwargs = getattr(self, key)
            if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
                raise ConfigError(f"{what}: {key} must be a table of name = value, got {kwargs!r}")
            if "trust_remote_code" in kwargs or "pretrained" in kwargs:
                raise ConfigError(f"{what}: {key} may not set 'trust_remote_code' or 'pretrained'")
            for k, v in kwargs.items():
                if k.endswith("_layer") and isinstance(v, str) and "." in v and v not in _NAMED_LAYERS:
                    raise ConfigError(f"{what}: {key}.{k} = {v!r} is not a known layer; "
                                      f"use one of {sorted(_NAMED_LAYERS)}")
            object.__setattr__(self, key, MappingProxyType(dict(kwargs)))

    # --- descriptions -------------------------------------------------------------------
    @property
    def is_hub(self) -> bool:
        return self.source.startswith(("hf-hub:", "hf_hub:"))

    @property
    def hub_repo(self) -> str | None:
        m = _HUB_ID.match(self.source)
        return m.group(1) if m else None

    @property
    def weights_tag(self) -> str:
        """The pretrained tag: `tv_in1k` for `resnet50.tv_in1k`, the repo for a Hub model."""
        if self.is_hub:
            return str(self.hub_repo) + (f"@{self.revision}" if self.revision else "")
        return self.source.split(".", 1)[1] if "." in self.source else ""

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes the numbers an encoder produces, except its weights (see weights_id)."""
        return {
            "source": self.source, "architecture": self.architecture, "truncate_after": self.truncate_after,
            "timm_kwargs": {k: str(v) for k, v in sorted(self.timm_kwargs.items())},
            "architecture_kwargs": {k: str(v) for k, v in sorted(self.architecture_kwargs.items())},
            "pooling": self.pooling, "embed_dim": self.embed_dim, "input_size": self.input_size,
            "resize_to": self.resize_to, "interpolation": self.interpolation,
            "mean": list(self.mean), "std": list(self.std),
        }

    def with_input_size(self, input_size: int) -> EncoderSpec:
        """The same encoder fed `input_size` images (e.g. tiny inputs in tests, or 256 px as CLAM does)."""
        return replace(self, input_size=int(input_size), resize_to=None)

    # --- building -----------------------------------------------------------------------
    def transform(self) -> PatchTransform:
        """uint8 RGB patches (H, W, 3) or (B, H, W, 3) -> normalised float (B, 3, S, S)."""
        return PatchTransform(self.input_size, self.mean, self.std, self.interpolation, self.resize_to)

    def create_model(
        self, weights: str | os.PathLike[str] | WeightsSource | None = None, *, random_init: bool = False,
        seed: int = 0, cache_dir: str | os.PathLike[str] | None = None,
    ) -> PatchEncoder:
        """A trainable `PatchEncoder` (train mode, gradients on): forward (B, 3, S, S) -> (B, embed_dim).

        Args:
            weights: explicit weights file or snapshot folder, or a source from `resolve_weights`;
                None looks in the HF cache, then the Hub.
            random_init: build with random weights (no lookup at all); weights id "random-init".
            seed: seed of the random initialisation (the global torch RNG is left untouched).
            cache_dir: Hugging Face cache folder (default: HF_HUB_CACHE).

        Raises:
            WeightsUnavailable: no local weights and the Hub cannot provide them (says how to fix it).
        """
        source = weights if isinstance(weights, WeightsSource) else self.resolve_weights(
            weights, random_init=random_init, cache_dir=cache_dir)
        backbone, removed = self._backbone(source, seed, cache_dir)
        if self.weights_format in CONVERTED_FORMATS and source.kind in ("file", "dir", "hf-cache", "hub"):
            self._load_converted(backbone, source)
        elif self.weights_format == "harness" and source.kind in ("file", "dir", "hf-cache", "hub"):
            self._load_harness(backbone, source)
        # timm's hf-hub/local-dir loaders already loaded Hub models; everything else loads here
        elif source.kind == "file" or (source.kind in ("hf-cache", "hub") and not self._timm_loads_hub):
            assert source.path is not None
            load_into(backbone, load_state_dict_file(source.path), what=f"encoder {self.name!r} ({source.path})",
                      ignore_prefixes=_CLASSIFIER_PREFIXES + tuple(f"{s}." for s in removed))
        if self._timm_loads_hub and source.kind in ("hf-cache", "hub", "dir"):
            self._warn_if_normalisation_differs(backbone)
        encoder = PatchEncoder(backbone, self.pooling, self.embed_dim, self.name, source.weights_id,
                               seed if source.kind == "random-init" else None)
        encoder.check_output(self.input_size)
        return encoder.train()

    def build(
        self, weights: str | os.PathLike[str] | WeightsSource | None = None, *, random_init: bool = False,
        seed: int = 0, trainable: bool = False, cache_dir: str | os.PathLike[str] | None = None,
    ) -> LoadedEncoder:
        """TRIDENT-style factory: (model, transform, precision) plus the weights id and the spec.

        The model is in eval mode with gradients off, unless `trainable`.
        """
        model = self.create_model(weights, random_init=random_init, seed=seed, cache_dir=cache_dir)
        if not trainable:
            model.eval().requires_grad_(False)
        return LoadedEncoder(model, self.transform(), self.precision, model.weights_id, self)

    @property
    def _timm_loads_hub(self) -> bool:
        """The Hub repo is a timm repo: timm's `hf-hub:` loader builds and loads it from its config.json."""
        return self.is_hub and self.hub_filename is None and self.weights_format == "timm"

    def _load_converted(self, backbone: torch.nn.Module, source: WeightsSource) -> None:
        """Load a transformers / torch-hub checkpoint into the timm architecture (`baselines.convert`), strictly.

        The weights file is the source's file, or the snapshot folder's model.safetensors/pytorch_model.bin; a
        transformers config.json beside it is checked against the architecture first.
        """
        import json

        from baselines.convert import check_hf_config, convert_state_dict, detect_kind
        from bench.common.console import warn

        assert source.path is not None
        path = snapshot_weights_file(source.path) if source.kind == "dir" else source.path
        what = f"encoder {self.name!r} ({path})"
        state = load_state_dict_file(path)
        kind = detect_kind(state)
        expected = "torch-hub-dinov2" if self.weights_format == "torch-hub" else ("transformers-vit",
                                                                                  "transformers-dinov2")
        if kind not in expected:
            raise ConfigError(f"{what}: the weights look like a {kind} checkpoint but the entry's weights_format is "
                              f"{self.weights_format!r}; fix weights_format or pass the right file")
        config_file = path.parent / "config.json"
        if kind.startswith("transformers") and config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{what}: cannot read {config_file}: {exc}") from None
            for message in check_hf_config(config, backbone, what=what):
                warn(message)
        converted = convert_state_dict(kind, state, target=backbone.state_dict(), what=what)
        load_into(backbone, converted, what=what)

    def _file_in_folder(self, folder: Path) -> Path:
        """A downloaded repo folder given for an entry whose weights are one named file (`hub_filename`)."""
        name = str(self.hub_filename)
        for candidate in (folder / name, folder / Path(name).name):
            if candidate.is_file():
                return candidate
        raise MissingFileError(f"encoder {self.name!r}: weights folder {folder} holds no {name}; pass the weights "
                               "file itself with --weights FILE")

    def _load_harness(self, backbone: torch.nn.Module, source: WeightsSource) -> None:
        """The authors' state dict -> the harness architecture, through its converter (`HARNESS_CONVERTERS`),
        loaded strictly."""
        assert source.path is not None
        path = snapshot_weights_file(source.path) if source.kind == "dir" else source.path
        what = f"encoder {self.name!r} ({path})"
        converted = HARNESS_CONVERTERS[str(self.architecture)](load_state_dict_file(path), backbone, what)
        load_into(backbone, converted, what=what)

    def _warn_if_normalisation_differs(self, backbone: torch.nn.Module) -> None:
        """The spec's mean/std are what the transform uses; say so when the Hub config disagrees."""
        from bench.common.console import warn

        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        for key in ("mean", "std"):
            hub = cfg.get(key)
            if hub is not None and not all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(hub, getattr(self, key))):
                warn(f"encoder {self.name!r}: {key} {tuple(getattr(self, key))} differs from its Hub config "
                     f"{tuple(hub)}; the spec's value is used (set {key} in the encoder config if that is wrong)")

    def resolve_weights(
        self, weights: str | os.PathLike[str] | None = None, *, random_init: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> WeightsSource:
        """Find the weights without building the model (file -> HF cache -> Hub; see `baselines.weights`).

        Cheap for cache and Hub sources; hashes an explicit file once. Pass the result to
        `build`/`create_model` to avoid a second lookup.
        """
        if random_init:
            if weights is not None:
                raise ConfigError(f"encoder {self.name!r}: give either weights={str(weights)!r} or random init, "
                                  "not both")
            return random_source()
        if self.weights_format == "custom":
            raise ConfigError(
                f"encoder {self.name!r}: its published weights ({self.hub_repo or self.source}) are a "
                f"{self.weights_format} checkpoint, not a timm state dict, and this harness has no converter for "
                "them yet; only its architecture is registered (meta-device check, --random-init smoke tests). "
                f"Licence: {self.licence or 'see the model page'} ({self.reference or self.source})")
        if weights is not None or self.weights is not None:
            given = Path(weights if weights is not None else self.weights).expanduser()  # type: ignore[arg-type]
            if self.weights_format == "harness" and self.hub_filename and given.is_dir():
                given = self._file_in_folder(given)
            return local_source(given)
        if self.is_hub:
            files = (self.hub_filename,) if self.hub_filename else HUB_WEIGHT_FILES
            try:
                # a timm repo's config.json is what timm builds from; a transformers repo's is checked against
                # the registered architecture (baselines.convert.check_hf_config)
                return hub_source(str(self.hub_repo), encoder=self.name, gated=self.gated,
                                  need_config=self.hub_filename is None, revision=self.revision,
                                  filenames=files, cache_dir=cache_dir, repo_type=self.hub_repo_type)
            except WeightsUnavailable as exc:
                if not self.licence:
                    raise
                raise WeightsUnavailable(f"{exc} Licence of {self.name!r}: {self.licence}; model page "
                                         f"{self.reference or 'https://huggingface.co/' + str(self.hub_repo)}"
                                         ) from None
        import timm

        cfg = timm.models.get_pretrained_cfg(self.source) if "." in self.source else None
        if cfg is None or not cfg.hf_hub_id:
            raise WeightsUnavailable(
                f"encoder {self.name!r}: timm has no Hub weights for {self.source!r}; pass a weights file with "
                "--weights FILE, or --random-init for a smoke test"
            )
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHT_FILES
        return hub_source(cfg.hf_hub_id, encoder=self.name, gated=self.gated, need_config=False,
                          filenames=files, cache_dir=cache_dir)

    def _backbone(self, source: WeightsSource, seed: int,
                  cache_dir: str | os.PathLike[str] | None) -> tuple[torch.nn.Module, tuple[str, ...]]:
        import timm

        kwargs = {"num_classes": 0, **_resolve_layers(self.timm_kwargs)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init (and timm's init before loading) is reproducible
            if self._timm_loads_hub and source.kind in ("hf-cache", "hub"):
                model = timm.create_model(f"hf-hub:{source.hub_ref}", pretrained=True, cache_dir=cache_dir, **kwargs)
            elif source.kind == "dir" and self.weights_format == "timm":
                snapshot_weights_file(source.path)  # type: ignore[arg-type]
                model = timm.create_model(f"local-dir:{source.path}", pretrained=True, **kwargs)
            else:
                arch = self.architecture or (None if self.is_hub else self.source)
                if arch is None:
                    raise ConfigError(
                        f"encoder {self.name!r} is a Hub model without an `architecture`; to load it from a "
                        "file or with random init, add architecture (and architecture_kwargs) to its config, "
                        "or pass the snapshot folder (config.json + weights) instead of the weights file"
                    )
                if arch in HARNESS_ARCHS:  # not a timm model: built here from timm parts
                    arch_kwargs = _resolve_layers(self.architecture_kwargs)
                    return HARNESS_ARCHS[arch](**arch_kwargs), ()
                if not timm.is_model(arch.split(".", 1)[0]):
                    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
                    raise ConfigError(f"encoder {self.name!r}: timm has no model {arch!r}"
                                      + (f"; did you mean {', '.join(close)}?" if close else ""))
                arch_kwargs = _resolve_layers(self.architecture_kwargs) if self.is_hub else {}
                model = timm.create_model(arch, pretrained=False, **{**arch_kwargs, **kwargs})
        return model, _truncate(model, self.truncate_after, self.name)


def _check_choice(what: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{what}: {key} must be one of {', '.join(choices)}, got {value!r}")


def _resolve_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import importlib

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v in _NAMED_LAYERS:
            module, attr = _NAMED_LAYERS[v]
            v = getattr(importlib.import_module(module), attr)
        out[k] = v
    return out


def _truncate(model: torch.nn.Module, after: str | None, name: str) -> tuple[str, ...]:
    """Replace the ResNet stages after `after` by identities; returns the removed stage names."""
    if after is None:
        return ()
    if not all(hasattr(model, s) for s in _RESNET_STAGES):
        raise ConfigError(f"encoder {name!r}: truncate_after needs a ResNet-family timm model (layer1..layer4)")
    removed = _RESNET_STAGES[_RESNET_STAGES.index(after) + 1:]
    for stage in removed:
        setattr(model, stage, torch.nn.Identity())
    return removed


# ------------------------------------------------------------------------------ architectures outside timm


class _AttentionalPooler(torch.nn.Module):
    """Learned queries cross-attending to a token sequence (CONCH's `attn_pool_contrast`).

    forward (B, T, context_dim) -> (B, n_queries, d_model). LayerNorm on the tokens and on the queries,
    bias-free projections, `n_head` heads; parameter names follow the published checkpoint's keys
    (query, ln_k, ln_q, to_q, to_kv, to_out) as listed in TRIDENT's conchv1_5.py.
    """

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = torch.nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_k = torch.nn.LayerNorm(context_dim)
        self.ln_q = torch.nn.LayerNorm(d_model)
        self.to_q = torch.nn.Linear(d_model, d_model, bias=False)
        self.to_kv = torch.nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(b, -1, -1)  # (B, Q, D)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)  # (B, T, D) each

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, H, L, D / H)
            return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(qk^T/sqrt d) v
        return self.to_out(out.transpose(1, 2).flatten(2))


class ConchV15Vision(torch.nn.Module):
    """CONCH v1.5's vision tower: ViT-L/16 trunk (all tokens after the final norm) -> one-query
    attentional pooler (1024 -> 768, 8 heads) -> LayerNorm(768); forward (B, 3, S, S) -> (B, 768).

    Facts from TRIDENT's patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py (CONCHVisionTower:
    iBOT-style vit_large with init_values 1.0, qkv bias, built at 224 and fed 448 px). The trunk is timm's
    ViT (same parameter names as the published `pytorch_model_vision.bin`: trunk.*, attn_pool_contrast.*,
    ln_contrast.*), but its token path is written here so that the position embedding is interpolated as the
    iBOT code does (bicubic with scale factor (S/16 + 0.1) / 14, the DINO round-off guard), not as timm's
    dynamic_img_size would (bicubic to a size): with timm's rule the 448 px features would differ.
    `trunk_kwargs` override the ViT-L sizes (tiny instances in tests).
    """

    def __init__(self, img_size: int = 224, d_model: int = 768, n_head: int = 8,
                 trunk_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        import timm

        self.trunk = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, img_size=img_size,
                                       init_values=1.0, **dict(trunk_kwargs or {}))
        width = int(self.trunk.embed_dim)
        self.attn_pool_contrast = _AttentionalPooler(d_model, width, n_head=n_head, n_queries=1)
        self.ln_contrast = torch.nn.LayerNorm(d_model)

    def position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """(1, 1 + rows/16 * cols/16, width): the built grid's embedding, resampled as iBOT's
        `interpolate_pos_encoding` does for an image of rows x cols pixels."""
        import torch.nn.functional as F

        pos = self.trunk.pos_embed
        n = pos.shape[1] - 1
        patch = self.trunk.patch_embed.patch_size[0]
        grid_rows, grid_cols = rows // patch, cols // patch
        if grid_rows * grid_cols == n and rows == cols:
            return pos
        side = math.sqrt(n)
        grid = pos[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((grid_rows + 0.1) / side, (grid_cols + 0.1) / side), mode="bicubic")
        if grid.shape[-2:] != (grid_rows, grid_cols):
            raise ConfigError(f"CONCH v1.5: the position grid resampled to {tuple(grid.shape[-2:])}, not "
                              f"{(grid_rows, grid_cols)}, for a {rows} x {cols} input")
        return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, grid_rows * grid_cols, -1)), dim=1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1 + H/16 * W/16, width): the trunk's normed tokens (iBOT forward_features)."""
        trunk = self.trunk
        tokens = trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat((trunk.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = trunk.pos_drop(tokens + self.position_embedding(x.shape[-2], x.shape[-1]))
        return trunk.norm(trunk.blocks(trunk.norm_pre(trunk.patch_drop(tokens))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_tokens(x))[:, 0])


def _conch_v15_published(state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                         what: str) -> dict[str, torch.Tensor]:
    """The published pytorch_model_vision.bin -> ConchV15Vision's keys (the same names): its trunk.pos_embed
    resampled to the built grid as TRIDENT's create_model_from_pretrained does (timm resample_abs_pos_embed,
    bilinear, no antialias, class position kept) when the sizes differ."""
    from timm.layers import resample_abs_pos_embed

    out = dict(state)
    key = "trunk.pos_embed"
    built = model.state_dict().get(key)
    if key in out and built is not None and out[key].shape != built.shape:
        if out[key].ndim != 3 or out[key].shape[-1] != built.shape[-1]:
            raise ConfigError(f"{what}: {key} has shape {tuple(out[key].shape)}; the architecture needs width "
                              f"{built.shape[-1]} (is this CONCH v1.5's vision tower?)")
        out[key] = resample_abs_pos_embed(out[key], new_size=list(model.trunk.patch_embed.grid_size),
                                          num_prefix_tokens=1, interpolation="bilinear", antialias=False,
                                          verbose=False)
    return out


class _ConvStem(torch.nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv + BN + ReLU stages (embed/8, embed/4 channels),
    then a 1x1 conv to `embed_dim`; a 4x4-patch replacement for Swin's patch projection, returning NHWC
    as timm's SwinTransformer expects. Sequential indices match the published keys (patch_embed.proj.N)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: Any = None, **_: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch != (4, 4) or embed_dim % 8:
            raise ConfigError(f"CTransPath's conv stem needs patch_size 4 and embed_dim divisible by 8, "
                              f"got {patch} and {embed_dim}")
        self.img_size, self.patch_size = size, patch
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[torch.nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _stage in range(2):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(c_out),
                       torch.nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(torch.nn.Conv2d(c_in, embed_dim, 1))
        self.proj = torch.nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else torch.nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, C, h, w) -> (B, h, w, C)


def _ctranspath(img_size: int = 224) -> torch.nn.Module:
    """Swin-T/4 window 7 with the conv stem (TRIDENT model_zoo/ctranspath/ctran.py builds timm_ctp's
    swin_tiny_patch4_window7_224 with embed_layer=ConvStem and an identity head): (B, 3, 224, 224) -> (B, 768)."""
    import timm

    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=img_size,
                             embed_layer=_ConvStem)


def _ctranspath_published(state: Mapping[str, torch.Tensor], model: torch.nn.Module,
                          what: str) -> dict[str, torch.Tensor]:
    """CHIEF_CTransPath.pth (timm_ctp 0.5.4's Swin layout, already unwrapped from its 'model' key) -> timm 1.x.

    The old layout downsamples at the end of a stage (`layers.i.downsample`, i = 0..2) and stores the
    `attn_mask` / `relative_position_index` buffers; timm 1.x downsamples at the start of the next stage and
    rebuilds the buffers. timm's own `swin_transformer.checkpoint_filter_fn` (written for the original
    Microsoft checkpoints, which have the old layout) does exactly this mapping, so it is used as is; the
    2 x 2 merge order of PatchMerging is the same in both versions.
    """
    from timm.models.swin_transformer import checkpoint_filter_fn

    if not any(k.startswith("layers.") for k in state):
        raise ConfigError(f"{what}: no 'layers.N' keys: this is not a Swin (CTransPath) state dict")
    out = checkpoint_filter_fn(dict(state), model)
    return {k: v for k, v in out.items() if not k.startswith("head.")}  # the published head is Identity


class MuskVision(torch.nn.Module):
    """MUSK's image path (BEiT-3 `musk_large_patch16_384`, vision experts only) on timm's ViT:
    forward (B, 3, 384, 384) -> the final-norm CLS token (B, 1024), or with `multiscale` (B, 2048).

    Facts from lilab-stanford/MUSK@714b666 (musk/modeling.py `_get_large_config`: 1024-d, 24 layers, 16 heads,
    FFN 4096, multiway, normalize_output; torchscale EncoderConfig defaults: pre-norm, sub-LN, LayerNorm eps 1e-5,
    exact GELU, no relative position, no embedding scale). An image-only forward uses only the multiway "A"
    (vision) experts, so BEiT-3 reduces to a pre-norm ViT with sub-LayerNorms: one before the attention output
    projection (timm `scale_attn_norm`) and one before fc2 (timm `scale_mlp_norm`); its position table starts at
    row 2 (fairseq offset). `multiscale` is MUSK's `ms_aug` (utils.MultiScaleForward, scales 1 and 2): the CLS
    of the image and the mean CLS of the 4 tiles of the image upsampled 2x (bicubic), concatenated; the MUSK
    README recommends it for linear probes and MIL, TRIDENT leaves it off. `vit_kwargs` override the ViT-L sizes
    (tiny instances in tests).
    """

    def __init__(self, img_size: int = 384, multiscale: bool = False, **vit_kwargs: Any) -> None:
        super().__init__()
        from functools import partial

        import timm

        sizes = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4.0, **vit_kwargs}
        self.vit = timm.create_model("vit_large_patch16_384", pretrained=False, num_classes=0, img_size=img_size,
                                     qkv_bias=True, scale_attn_norm=True, scale_mlp_norm=True,
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-5), **sizes)
        self.multiscale = bool(multiscale)

    def cls(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.multiscale:
            return self.cls(x)
        import torch.nn.functional as F

        b, _, size, _ = x.shape
        up = F.interpolate(x.float(), size=2 * size, mode="bicubic").to(x.dtype)
        tiles = torch.cat([up[..., r:r + size, c:c + size] for r in (0, size) for c in (0, size)])  # (4B, 3, S, S)
        # MUSK resamples both scales in float32 (scale 1 too, which only rounds a float64 input)
        return torch.cat((self.cls(x.float().to(x.dtype)), self.cls(tiles).unflatten(0, (4, b)).mean(0)), dim=-1)


_MUSK_LAYER = {
    "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2", "self_attn.inner_attn_ln": "attn.norm",
    "self_attn.out_proj": "attn.proj", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2", "ffn.ffn_layernorm": "mlp.norm",
}


def _musk_published(state: Mapping[str, torch.Tensor], model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """MUSK's model.safetensors (BEiT-3 keys, `beit3.` prefix) -> MuskVision: the vision ("A") experts mapped onto
    timm names, q/k/v fused in that order, the position table's rows from 2 on (resampled bicubic to the built
    grid as MUSK's load_model_and_may_interpolate does, if its grid differs); the text experts ("B"), text
    embedding, mask token, projection heads and logit scale are dropped (an image embedding without the head,
    as TRIDENT and the MUSK README use it)."""
    from timm.layers import resample_abs_pos_embed

    sd = {k.removeprefix("module.").removeprefix("beit3."): v for k, v in state.items()}
    if "encoder.embed_positions.A.weight" not in sd:
        raise ConfigError(f"{what}: no beit3.encoder.embed_positions.A.weight: this is not a MUSK (BEiT-3) "
                          "state dict")
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if ".B." in key or key.startswith(("text_embed.", "language_head.", "vision_head.")) or key in (
                "logit_scale", "vision_embed.mask_token", "encoder.embed_positions.B.weight"):
            continue
        if key in ("vision_embed.proj.weight", "vision_embed.proj.bias"):
            out["vit.patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key == "vision_embed.cls_token":
            out["vit.cls_token"] = value
        elif key == "encoder.embed_positions.A.weight":
            out["vit.pos_embed"] = value[2:].unsqueeze(0)  # fairseq: positions start at 2
        elif key.startswith("encoder.layer_norm.A."):
            out["vit.norm." + key.rsplit(".", 1)[1]] = value
        elif ".A." not in key:
            unmapped.append(key)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)",
                               key.replace(".A.", ".")):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key.replace(".A.", ".")):
            if m.group(2) not in _MUSK_LAYER:
                unmapped.append(key)
                continue
            out[f"vit.blocks.{m.group(1)}.{_MUSK_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            unmapped.append(key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ConfigError(f"{what}: layer {layer} lacks {sorted({'q', 'k', 'v'} - set(parts))}_proj.A.{kind}")
        out[f"vit.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if unmapped:
        raise ConfigError(f"{what}: keys with no place in MUSK's image path: {unmapped[:5]}")
    built = model.state_dict()["vit.pos_embed"]
    pos = out.get("vit.pos_embed")
    if pos is not None and pos.shape != built.shape and pos.shape[-1] == built.shape[-1]:
        # MUSK's formula (float32 bicubic to the new size, align_corners False, class row kept) is timm's
        out["vit.pos_embed"] = resample_abs_pos_embed(pos, new_size=list(model.vit.patch_embed.grid_size),
                                                      num_prefix_tokens=1, interpolation="bicubic",
                                                      antialias=False, verbose=False)
    return out


# architectures built here (name -> builder(**architecture_kwargs) returning a module whose forward gives (B, D))
HARNESS_ARCHS: dict[str, Any] = {"harness:conch-v15-vision": ConchV15Vision, "harness:ctranspath": _ctranspath,
                                 "harness:musk-vision": MuskVision}
# their published checkpoints -> the built module's keys: converter(state_dict, model, what) (weights_format "harness")
HARNESS_CONVERTERS: dict[str, Any] = {"harness:conch-v15-vision": _conch_v15_published,
                                      "harness:ctranspath": _ctranspath_published,
                                      "harness:musk-vision": _musk_published}


# ------------------------------------------------------------------------------ modules


class PatchEncoder(torch.nn.Module):
    """timm backbone + pooling: forward(x (B, 3, S, S) normalised) -> (B, embed_dim).

    The one encoder type of both paradigms: two-stage extraction runs it frozen, the
    end-to-end trainer trains it. `weights_id` says where its weights came from.
    """

    def __init__(self, backbone: torch.nn.Module, pooling: str, embed_dim: int, encoder_name: str,
                 weights_id: str, init_seed: int | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.embed_dim = embed_dim
        self.encoder_name = encoder_name
        self.weights_id = weights_id
        self.init_seed = init_seed  # set only for random init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.backbone(x)  # (B, D): timm pools, the head is an identity
        feats = self.backbone.forward_features(x)
        if self.pooling == "avg":
            if feats.ndim != 4:
                raise ConfigError(f"encoder {self.encoder_name!r}: pooling 'avg' needs a CNN feature map, "
                                  f"got features of shape {tuple(feats.shape)}; use cls, mean or model")
            return feats.mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
        n_prefix = int(getattr(self.backbone, "num_prefix_tokens", 1))  # class + register tokens
        cls = feats[:, 0]  # (B, T, C) -> (B, C)
        if self.pooling == "cls":
            return cls
        mean = feats[:, n_prefix:].mean(dim=1)  # patch tokens only: (B, C)
        return mean if self.pooling == "mean" else torch.cat([cls, mean], dim=-1)  # (B, 2C)

    def check_output(self, input_size: int) -> None:
        """One dry forward: the embedding size must be the spec's (a wrong spec fails here, not mid-cohort)."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(torch.zeros(1, 3, input_size, input_size))
        finally:
            self.train(was_training)
        if tuple(out.shape) != (1, self.embed_dim):
            raise ConfigError(f"encoder {self.encoder_name!r} produces embeddings of shape {tuple(out.shape[1:])} "
                              f"but its spec says embed_dim = {self.embed_dim}; fix embed_dim or pooling")


class PatchTransform:
    """uint8 RGB patches -> normalised float tensor, the same on CPU (DataLoader workers) and CUDA.

    Accepts a numpy array or tensor, (H, W, 3) or (B, H, W, 3), and returns (B, 3, S, S)
    float32: resized (antialiased) to `input_size`, or to `resize_to` and centre-cropped, then
    normalised with mean/std. Picklable, so DataLoader workers can run it.
    """

    def __init__(self, input_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 interpolation: str = "bilinear", resize_to: int | None = None) -> None:
        self.input_size = int(input_size)
        self.resize_to = int(resize_to) if resize_to else self.input_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.interpolation = interpolation

    def __call__(self, patches: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        x = torch.as_tensor(patches)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise DataError(f"patches must be uint8 RGB (H, W, 3) or (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        mean = torch.tensor(self.mean, device=x.device).mul_(255).view(1, 3, 1, 1)
        scale = torch.tensor(self.std, device=x.device).mul_(255).reciprocal_().view(1, 3, 1, 1)
        if x.shape[1:3] == (self.resize_to, self.resize_to) and self.resize_to == self.input_size:
            # the common case (patches already at input size): reorder the uint8 bytes to (B, 3, H, W)
            # first, then one float pass and two in-place ones; 2.5x cheaper than converting the
            # channel-last view and copying it contiguous at the end, and the same values
            x = x.permute(0, 3, 1, 2).contiguous().float()  # (B, 3, S, S) in 0..255
            return x.sub_(mean).mul_(scale)  # (x/255 - mean) / std
        x = x.permute(0, 3, 1, 2).float()  # (B, 3, H, W) in 0..255
        if x.shape[-2:] != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode=self.interpolation,
                              antialias=True, align_corners=False)
        if self.resize_to != self.input_size:
            top = (self.resize_to - self.input_size) // 2
            x = x[..., top:top + self.input_size, top:top + self.input_size]  # centre crop
        return x.sub_(mean).mul_(scale).contiguous()  # (x/255 - mean) / std, in one pass

    def __repr__(self) -> str:
        return (f"PatchTransform(input_size={self.input_size}, resize_to={self.resize_to}, "
                f"interpolation={self.interpolation!r}, mean={self.mean}, std={self.std})")


class LoadedEncoder(NamedTuple):
    """What `EncoderSpec.build` returns (TRIDENT's (model, transforms, precision) + provenance)."""

    model: PatchEncoder
    transform: PatchTransform
    precision: str
    weights_id: str
    spec: EncoderSpec


# ------------------------------------------------------------------------------ registry

ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def register_encoder(spec: EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add a spec to the registry; a second spec under the same name is an error unless `replace`."""
    return ENCODERS.register(spec.name, spec, replace=replace)


def get_encoder(name: str) -> EncoderSpec:
    """The spec registered under `name`; an unknown name lists close and known names."""
    return ENCODERS.get(name)


def build_encoder(name: str, weights: str | os.PathLike[str] | None = None, *, random_init: bool = False,
                  seed: int = 0, trainable: bool = False, input_size: int | None = None,
                  cache_dir: str | os.PathLike[str] | None = None) -> LoadedEncoder:
    """`get_encoder(name).build(...)`, optionally at another input size."""
    spec = get_encoder(name)
    if input_size is not None:
        spec = spec.with_input_size(input_size)
    return spec.build(weights, random_init=random_init, seed=seed, trainable=trainable, cache_dir=cache_dir)


_CONFIG_KEYS = {
    "source": str, "embed_dim": int, "input_size": int, "mean": list, "std": list, "precision": str,
    "gated": bool, "pooling": str, "timm_kwargs": dict, "architecture": str, "architecture_kwargs": dict,
    "truncate_after": str, "interpolation": str, "resize_to": int, "revision": str, "weights": str,
    "reference": str, "magnification": str, "licence": str, "source_note": str, "weights_format": str,
    "hub_filename": str, "hub_repo_type": str,
}


def spec_from_config(name: str, config: Mapping[str, Any], *, where: str = "encoder config") -> EncoderSpec:
    """Validate a suite file's encoder table and make a spec (not registered).

    Example (TOML)::

        [encoders.my-vit]
        source = "hf-hub:my-org/my-vit"          # or a timm name, e.g. "convnext_tiny.fb_in22k"
        embed_dim = 768
        input_size = 224
        mean = [0.485, 0.456, 0.406]
        std = [0.229, 0.224, 0.225]
        pooling = "cls"
        timm_kwargs = { dynamic_img_size = true }

    Raises:
        ConfigError: unknown keys (with close names), missing `source`/`embed_dim`, bad values.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: encoder {name!r} must be a table of keys, got {type(config).__name__}")
    unknown = [k for k in config if k not in _CONFIG_KEYS]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(k), _CONFIG_KEYS, n=1))
                 else repr(k) for k in unknown]
        raise ConfigError(f"{where}: encoder {name!r} has unknown keys {', '.join(hints)}; "
                          f"allowed: {', '.join(_CONFIG_KEYS)}")
    missing = [k for k in ("source", "embed_dim") if k not in config]
    if missing:
        raise ConfigError(f"{where}: encoder {name!r} lacks {', '.join(missing)} (a timm name or "
                          "'hf-hub:<org>/<repo>' as source, and the embedding size as embed_dim)")
    values: dict[str, Any] = {}
    for key, value in config.items():
        kind = _CONFIG_KEYS[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is list:
            ok = isinstance(value, (list, tuple))
        if not ok:
            raise ConfigError(f"{where}: encoder {name!r} key {key!r} must be a {kind.__name__}, got {value!r}")
        values[key] = tuple(value) if kind is list else value
    try:
        return EncoderSpec(name=name, **values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def register_encoder_from_config(name: str, config: Mapping[str, Any], *, where: str = "encoder config",
                                 replace: bool = False) -> EncoderSpec:
    """Register a user encoder from a suite file's table (see `spec_from_config`), without touching code."""
    return register_encoder(spec_from_config(name, config, where=where), replace=replace)


# ------------------------------------------------------------------------------ built-ins
# The registry is data: baselines/encoders.toml (one table per encoder, each with its model card and
# what was looked up there). Loaded once at import; a bad entry is a ConfigError naming it and the field.
REGISTRY_FILE = Path(__file__).with_name("encoders.toml")


def load_registry_file(path: str | os.PathLike[str]) -> list[EncoderSpec]:
    """Read an encoder registry file (TOML, `[encoders.<name>]` tables) into validated specs (not registered).

    Raises:
        ConfigError: the file is not TOML, has no `encoders` table, or an entry has an unknown, missing
            or bad field (the message names the file, the entry and the field).
    """
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"encoder registry {path} is not valid TOML: {exc}") from None
    tables = data.get("encoders")
    unknown = sorted(set(data) - {"encoders", "slide_encoders"})  # slide encoders: baselines.encoders_slide
    if not isinstance(tables, Mapping) or unknown:
        raise ConfigError(f"encoder registry {path} must hold only [encoders.<name>] tables"
                          + (f"; found top-level keys {unknown}" if unknown else ""))
    return [spec_from_config(name, table, where=str(path)) for name, table in tables.items()]


def check_on_meta(spec: EncoderSpec) -> tuple[int, int]:
    """Build `spec`'s architecture on the meta device (no memory, no weights, no download) and run one
    forward at its input size; returns (embedding size, parameter count).

    Raises:
        ConfigError: the architecture cannot take `input_size` images, or its embedding size is not the
            entry's `embed_dim` (the message names the entry and the field).
    """
    with torch.device("meta"):
        backbone, _ = spec._backbone(random_source(), 0, None)
        encoder = PatchEncoder(backbone, spec.pooling, spec.embed_dim, spec.name, RANDOM_INIT)
        try:
            out = encoder(torch.zeros(1, 3, spec.input_size, spec.input_size))
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"encoder {spec.name!r}: input_size = {spec.input_size} does not fit its "
                              f"architecture ({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    if tuple(out.shape) != (1, spec.embed_dim):
        raise ConfigError(f"encoder {spec.name!r}: embed_dim = {spec.embed_dim} but its architecture "
                          f"({spec.architecture or spec.source}, pooling {spec.pooling!r}) gives "
                          f"{tuple(out.shape[1:])}; fix embed_dim, pooling or the architecture kwargs")
    return int(out.shape[1]), sum(p.numel() for p in encoder.parameters())


for _spec in load_registry_file(REGISTRY_FILE):
    register_encoder(_spec)
del _spec

__all__ = [
    "EncoderSpec", "PatchEncoder", "PatchTransform", "LoadedEncoder", "ENCODERS", "register_encoder",
    "register_encoder_from_config", "spec_from_config", "get_encoder", "build_encoder",
    "IMAGENET_MEAN", "IMAGENET_STD", "POOLINGS", "PRECISIONS", "RANDOM_INIT", "WEIGHTS_FORMATS",
    "REGISTRY_FILE", "load_registry_file", "check_on_meta", "HARNESS_ARCHS", "HARNESS_CONVERTERS", "ConchV15Vision",
    "MuskVision",
]
