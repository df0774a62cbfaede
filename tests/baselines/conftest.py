"""Fixtures shared by the baselines tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def registry_guard():
    """Remove encoders a test registers, so tests stay independent."""
    from baselines.encoders import ENCODERS

    before = set(ENCODERS.names())
    yield
    for name in set(ENCODERS.names()) - before:
        del ENCODERS._items[name]


@pytest.fixture
def hf_snapshot(tmp_path, monkeypatch):
    """`write(repo, files, commit, repo_type="model")`: an HF-cache snapshot of `repo` at `commit` holding `files`
    (path inside the repo, sub-folders allowed -> a tensors dict for *.safetensors, a JSON-able dict for *.json,
    anything else torch.save'd), with refs/main at that commit and huggingface_hub pointed at the cache, offline.
    Returns the snapshot folder."""
    import json

    import huggingface_hub.constants as hf_constants
    import torch

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def write(repo: str, files: dict, commit: str, repo_type: str = "model"):
        folder = cache / f"{repo_type}s--{repo.replace('/', '--')}"
        snap = folder / "snapshots" / commit
        for name, content in files.items():
            target = snap / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name.endswith(".json"):
                target.write_text(json.dumps(content))
            elif name.endswith(".safetensors"):
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in content.items()}, str(target))
            else:
                torch.save(content, target)
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        return snap

    return write
