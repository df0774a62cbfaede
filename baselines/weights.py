"""Where an encoder's weights come from, and the id that records which they were.

Lookup order (the first that applies wins; TRIDENT's order, without its import-time
network probe):

1. **An explicit local file or folder** (`--weights FILE`, `weights = "FILE"` in the
   suite). `.safetensors` is read directly; `.pt/.pth/.bin` only through
   `torch.load(weights_only=True)`, which refuses pickled Python objects other than
   tensors and plain containers. A folder is a downloaded Hub snapshot
   (`config.json` + weights, e.g. from `hf download REPO --local-dir DIR`).
   Weights id: `sha256:<hex>` of the weights file.
2. **The local Hugging Face cache** (`HF_HUB_CACHE`, default `~/.cache/huggingface/hub`).
   No network is touched, so this works with `HF_HUB_OFFLINE=1`.
   Weights id: `hf:<repo>@<commit>`.
3. **The Hugging Face Hub**, with the token that `huggingface_hub` finds itself
   (`HF_TOKEN`, or `hf auth login` / `huggingface-cli login`); the token is never read, logged or
   printed here. The files land in the cache, so the next run takes step 2.
   Weights id: `hf:<repo>@<commit>`.

Random initialisation is never a fallback: it happens only when asked for
(`random_init=True`, `--random-init`), and its weights id is `random-init`.
No `trust_remote_code` anywhere: every architecture is a timm model.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common.errors import BenchError, ConfigError, DataError, MissingFileError
from bench.common.files import sha256_file

if TYPE_CHECKING:
    import torch

RANDOM_INIT = "random-init"
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# File names a Hub snapshot keeps its weights under, in the order timm prefers them.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Wrappers that training scripts put around a state dict.
_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher", "encoder")


class WeightsUnavailable(BenchError):
    """The weights of an encoder cannot be found locally nor fetched from the Hub."""


@dataclass(frozen=True)
class WeightsSource:
    """Resolved weights: where they are and the id every feature file and record keeps.

    Attributes:
        kind: "file", "dir", "hf-cache", "hub" or "random-init".
        weights_id: `sha256:<hex>`, `hf:<repo>@<commit>` or `random-init`.
        path: the local weights file (or snapshot folder for "dir").
        hub_ref: `<repo>@<commit>` for Hub/cache sources, so timm loads that exact revision.
    """

    kind: str
    weights_id: str
    path: Path | None = None
    hub_ref: str | None = None


def random_source() -> WeightsSource:
    return WeightsSource(kind="random-init", weights_id=RANDOM_INIT)


# --------------------------------------------------------------------------- local files


def local_source(path: str | os.PathLike[str]) -> WeightsSource:
    """Step 1: an explicit weights file, or a folder holding a Hub snapshot."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"weights file {path} does not exist; check the path given with --weights "
                               "or `weights =` in the suite")
    if path.is_dir():
        weights = snapshot_weights_file(path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"weights folder {path} has no config.json; pass the weights file itself "
                f"({weights.name}) instead of the folder"
            )
        return WeightsSource(kind="dir", weights_id=f"sha256:{sha256_file(weights)}", path=path)
    suffix = path.suffix.lower()
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ConfigError(
            f"weights file {path} has suffix {suffix!r}; expected .safetensors (preferred) or "
            ".pt/.pth/.bin (read with torch.load(weights_only=True))"
        )
    return WeightsSource(kind="file", weights_id=f"sha256:{sha256_file(path)}", path=path)


def snapshot_weights_file(folder: Path) -> Path:
    for name in HUB_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(f"weights folder {folder} holds none of {', '.join(HUB_WEIGHT_FILES)}")


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; pickles are opened only with `weights_only=True`.

    Raises:
        ConfigError: the file holds Python objects that `weights_only` refuses, or no tensors.
        DataError: the file is damaged.
    """
    import torch

    path = Path(path)
    if path.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise DataError(f"cannot read safetensors file {path}: {exc}; re-download or re-export it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"refused to load {path}: it pickles Python objects other than tensors ({first}). "
            "Unknown pickles can run code, so only weights_only=True loading is allowed. Convert it to "
            "safetensors where you trust it (torch.load + safetensors.torch.save_file) and pass that file."
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise DataError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
            raise ConfigError(f"weights file {path} is not a state dict: entries {bad} are not tensors")
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"weights file {path} holds no state dict (got {type(obj).__name__})")
    return {str(k): v for k, v in obj.items()}


def _all_tensors(d: Mapping) -> bool:
    import torch

    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_into(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str,
    ignore_prefixes: Sequence[str] = (),
) -> None:
    """Load `state_dict` into `module`; every parameter must be covered.

    Keys under `ignore_prefixes` (a classifier head, stages cut off a truncated
    ResNet) may be present in the file and are dropped; a common `module.` or
    `backbone.` prefix (DDP, our own encoder wrapper) is stripped.
    """
    sd = dict(state_dict)
    for prefix in ("module.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    expected = module.state_dict()
    unexpected = [k for k in sd if k not in expected]
    extra = [k for k in unexpected if not k.startswith(tuple(ignore_prefixes))]
    missing = [k for k in expected if k not in sd]
    if missing or extra:
        raise ConfigError(
            f"weights for {what} do not fit its architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(extra)} unexpected keys (e.g. {extra[:3]}). "
            "Check that the file belongs to this encoder (and its timm kwargs)."
        )
    bad_shape = [k for k in expected if tuple(sd[k].shape) != tuple(expected[k].shape)]
    if bad_shape:
        k = bad_shape[0]
        raise ConfigError(
            f"weights for {what}: {k} has shape {tuple(sd[k].shape)} in the file but "
            f"{tuple(expected[k].shape)} in the model ({len(bad_shape)} mismatches)"
        )
    module.load_state_dict({k: sd[k] for k in expected}, strict=True)


# --------------------------------------------------------------------------- the Hub


def hub_source(
    repo_id: str, *, encoder: str, gated: bool, need_config: bool, revision: str | None = None,
    filenames: Sequence[str] = HUB_WEIGHT_FILES, cache_dir: str | os.PathLike[str] | None = None,
    repo_type: str = "model",
) -> WeightsSource:
    """Steps 2 and 3: the local HF cache, else a download from the Hub.

    Args:
        repo_id: Hub repository, e.g. "MahmoodLab/UNI2-h" or "timm/resnet50.tv_in1k".
        encoder: encoder name, for error messages.
        gated: whether the repository needs an accepted licence (for the error message).
        need_config: also fetch config.json (models built through timm's `hf-hub:` loader).
        revision: branch, tag or commit; default "main".
        filenames: candidate weight files (paths inside the repo, sub-folders allowed), first found wins.
        repo_type: "model", or "dataset" for weights kept in a dataset repo (CTransPath in MahmoodLab/hest-bench).
    """
    cached = _from_cache(repo_id, revision, filenames, need_config, cache_dir, repo_type)
    if cached is not None:
        path, commit = cached
        return WeightsSource(kind="hf-cache", weights_id=f"hf:{repo_id}@{commit}", path=path,
                             hub_ref=f"{repo_id}@{commit}")
    path = _download(repo_id, revision, filenames, need_config, cache_dir, encoder=encoder, gated=gated,
                     repo_type=repo_type)
    commit = snapshot_commit(path)
    return WeightsSource(kind="hub", weights_id=f"hf:{repo_id}@{commit}", path=path, hub_ref=f"{repo_id}@{commit}")


def snapshot_commit(path: Path) -> str:
    """The commit of a file in the HF cache: the folder under `snapshots/` that holds it (`.../snapshots/<commit>/
    sub/dir/file`); the parent folder's name where the path is not in that layout."""
    for parent in path.parents:
        if parent.parent.name == "snapshots":
            return parent.name
    return path.parent.name


def _from_cache(repo_id: str, revision: str | None, filenames: Sequence[str], need_config: bool,
                cache_dir: str | os.PathLike[str] | None, repo_type: str = "model") -> tuple[Path, str] | None:
    from huggingface_hub import try_to_load_from_cache

    weights = None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision, repo_type=repo_type)
        if isinstance(found, str):
            weights = Path(found)
            break
    if weights is None:
        return None
    if need_config and not isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir,
                                                             revision=revision, repo_type=repo_type), str):
        return None
    return weights, snapshot_commit(weights)


def _download(repo_id: str, revision: str | None, filenames: Sequence[str], need_config: bool,
              cache_dir: str | os.PathLike[str] | None, *, encoder: str, gated: bool, repo_type: str = "model") -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir, repo_type=repo_type))

    try:
        if need_config:
            fetch("config.json")
        for name in filenames:
            try:
                return fetch(name)
            except LocalEntryNotFoundError:
                raise
            except EntryNotFoundError:
                continue  # the repository has no file of this name: try the next one
        raise WeightsUnavailable(
            f"Hub repository {repo_id} (encoder {encoder!r}) has none of the weight files {list(filenames)}; "
            "pass a local weights file with --weights FILE"
        )
    except GatedRepoError:
        why = "it is gated and this account has not been granted access (or no token was found)"
    except RepositoryNotFoundError:
        why = ("the repository was not found, or it is gated and no valid token was sent"
               if gated else "the repository was not found")
    except RevisionNotFoundError:
        why = f"revision {revision!r} does not exist"
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "the weights are not in the local Hugging Face cache and the Hub cannot be reached (offline)"
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        why = f"the Hub answered HTTP {status}"
    except OSError as exc:  # DNS failure, refused connection, timeout
        why = f"the Hub cannot be reached ({type(exc).__name__})"
    raise WeightsUnavailable(how_to_provide(encoder, repo_id, why, gated, repo_type))


def how_to_provide(encoder: str, repo_id: str, why: str, gated: bool, repo_type: str = "model") -> str:
    """The message for missing weights: which model, why, and the ways to provide them."""
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    dataset = " --repo-type dataset" if repo_type == "dataset" else ""
    access = (f"request access at {page} with the account whose token you use, then "
              if gated else "")
    return (
        f"cannot load weights for encoder {encoder!r} from Hugging Face repo {repo_id}: {why}. "
        f"To provide them: (1) {access}set HF_TOKEN in the environment or log in (`hf auth login`, formerly "
        "`huggingface-cli login`), and run once with network access (the files are then cached and later "
        "runs work offline with HF_HUB_OFFLINE=1); or (2) download the weights file (or the whole repo with `hf download "
        f"{repo_id}{dataset} --local-dir DIR`) and pass it with --weights FILE|DIR, or `weights = \"FILE\"` "
        "for this encoder in the suite file; or (3) for a smoke test only, --random-init (recorded as "
        "weights id 'random-init')."
    )


__all__ = [
    "RANDOM_INIT", "WeightsSource", "WeightsUnavailable", "random_source", "local_source", "hub_source",
    "snapshot_commit",
    "load_state_dict_file", "load_into", "how_to_provide", "snapshot_weights_file",
]
