"""Slide encoders: pretrained models that turn a bag of patch features (and coords) into one embedding.

Registered as data in baselines/encoders.toml (`[slide_encoders.<name>]`), each with the patch encoder
it was trained on, that encoder's feature size and magnification, and what it needs to run. A slide
encoder only makes sense on features of its own patch encoder, so `check_pairing` refuses any other:

    >>> check_pairing("prism", "uni")                       # doctest: +SKIP
    ConfigError: slide encoder 'prism' was trained on 'virchow' features (2560-d at 20x) ...

FEATHER, CHIEF, PRISM, TITAN and Prov-GigaPath's slide encoder are written here in plain torch
(baselines/slide) and run as the aggregators `<name>` (frozen + linear probe) and `<name>-ft`
(fine-tuned), baselines/mil/slide.py; TITAN and GigaPath also take the patch grid positions.
`require_runnable` says what is missing for an entry without an architecture here. The harness loads
no remote code.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.errors import ConfigError
from bench.common.registry import Registry
from bench.data.layout import check_name

_KEYS = {"source": str, "embed_dim": int, "patch_encoder": str, "patch_dim": int, "magnification": str,
         "gated": bool, "licence": str, "needs": str, "reference": str, "source_note": str}
_REQUIRED = ("source", "embed_dim", "patch_encoder", "patch_dim")


@dataclass(frozen=True)
class SlideEncoderSpec:
    """One pretrained slide encoder and the patch encoder it requires.

    Attributes:
        name: registry name (method `two-stage/<patch encoder>/<name>`).
        source: where its weights are (`hf-hub:<org>/<repo>` or a code repository).
        embed_dim: size of the slide embedding it returns.
        patch_encoder: registered name of the patch encoder whose features it takes.
        patch_dim: feature size it expects (the patch encoder's embed_dim).
        magnification: magnification of the patches it was trained on.
        needs: what must be installed or opted into to run it.
    """

    name: str
    source: str
    embed_dim: int
    patch_encoder: str
    patch_dim: int
    magnification: str = ""
    gated: bool = False
    licence: str = ""
    needs: str = ""
    reference: str = ""
    source_note: str = ""

    def __post_init__(self) -> None:
        check_name("slide encoder", self.name)
        for key in ("embed_dim", "patch_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"slide encoder {self.name!r}: {key} must be a positive integer, got {value!r}")

    @property
    def implemented(self) -> bool:
        """Whether its architecture is written here (baselines/slide), i.e. it runs as aggregator `<name>`."""
        from baselines.slide import SLIDE_ARCHS

        return self.name in SLIDE_ARCHS.names()


SLIDE_ENCODERS: Registry[SlideEncoderSpec] = Registry("slide encoder")


def slide_spec_from_config(name: str, config: Mapping[str, Any], *, where: str) -> SlideEncoderSpec:
    """Validate one `[slide_encoders.<name>]` table (unknown, missing or mistyped fields are named)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: slide encoder {name!r} must be a table of keys")
    unknown = [k for k in config if k not in _KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), _KEYS, n=1)
        raise ConfigError(f"{where}: slide encoder {name!r} has unknown key {unknown[0]!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "") + f"; allowed: {', '.join(_KEYS)}")
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ConfigError(f"{where}: slide encoder {name!r} lacks {', '.join(missing)}")
    for key, value in config.items():
        kind = _KEYS[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: slide encoder {name!r} key {key!r} must be a {kind.__name__}, got {value!r}")
    try:
        return SlideEncoderSpec(name=name, **config)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_slide_registry(path: str | Path) -> list[SlideEncoderSpec]:
    import tomllib

    path = Path(path)
    tables = tomllib.loads(path.read_text(encoding="utf-8")).get("slide_encoders", {})
    return [slide_spec_from_config(name, table, where=str(path)) for name, table in tables.items()]


def check_pairing(slide_encoder: str, patch_encoder: str) -> SlideEncoderSpec:
    """The slide encoder's spec if `patch_encoder` is the one it was trained on, else a ConfigError
    naming both and the one it needs (with that encoder's feature size and magnification)."""
    spec = SLIDE_ENCODERS.get(slide_encoder)
    if patch_encoder != spec.patch_encoder:
        from baselines.encoders import ENCODERS

        known = set(ENCODERS.names())
        given_dim = f" ({ENCODERS.get(patch_encoder).embed_dim}-d)" if patch_encoder in known else ""
        registered = "" if spec.patch_encoder in known else " (not registered in this harness)"
        raise ConfigError(
            f"slide encoder {slide_encoder!r} cannot take features of patch encoder {patch_encoder!r}{given_dim}: "
            f"it was trained on {spec.patch_encoder!r}{registered} features ({spec.patch_dim}-d at "
            f"{spec.magnification if spec.magnification and 'not looked up' not in spec.magnification else 'its magnification'}); "
            f"use two-stage/{spec.patch_encoder}/{slide_encoder}"
        )
    return spec


def require_runnable(slide_encoder: str) -> SlideEncoderSpec:
    """The spec of `slide_encoder`, or a ConfigError saying what is needed to run it."""
    spec = SLIDE_ENCODERS.get(slide_encoder)
    if not spec.implemented:
        raise ConfigError(f"slide encoder {slide_encoder!r} ({spec.source}) does not run in this harness yet: "
                          f"{spec.needs or 'its architecture is not written here'}; see {spec.reference or spec.source}")
    return spec


def _register_builtins() -> None:
    from baselines.encoders import ENCODERS, REGISTRY_FILE

    for spec in load_slide_registry(REGISTRY_FILE):
        patch = ENCODERS.get(spec.patch_encoder) if spec.patch_encoder in ENCODERS.names() else None
        if patch is not None and patch.embed_dim != spec.patch_dim:
            raise ConfigError(f"{REGISTRY_FILE}: slide encoder {spec.name!r} field 'patch_dim' = {spec.patch_dim} "
                              f"but patch encoder {spec.patch_encoder!r} has embed_dim {patch.embed_dim}")
        SLIDE_ENCODERS.register(spec.name, spec)


_register_builtins()

__all__ = ["SlideEncoderSpec", "SLIDE_ENCODERS", "check_pairing", "require_runnable", "slide_spec_from_config",
           "load_slide_registry"]
