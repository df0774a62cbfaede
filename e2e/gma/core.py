"""The gather/scatter step of the GMA paper (section 2, listing 1), and its one-device twin.

One optimisation step works on one bag: K tiles are sampled from its slides
(`sample_tiles`, the same on every process), cut into N contiguous shares
(`share_bounds`, shares may differ by one tile), and encoded by N encoder
processes. Rank 0 gathers the features, runs the aggregator and the task loss,
backpropagates to the gathered (K, D) feature matrix and scatters each encoder
rank its slice of the feature gradient g; each encoder rank then backpropagates
the pseudo-loss ``N * sum(f * g)``, whose gradient, after DDP averages it over
the N ranks, is exactly the gradient of the slide loss (the chain rule, cut at
the features). `gma_step` is that step, written once for two topologies:

- `DistTopology`: torch.distributed, 1 aggregator rank + N encoder ranks
  (gloo on CPU, NCCL on GPUs), the paper's set-up;
- `LocalTopology`: one process is both sides ("chunked mode", beyond the
  paper): the K tiles are encoded in chunks without keeping activations, the
  aggregator runs on the full (K, D) matrix, then every chunk is encoded again
  with gradients and backpropagates its slice of g. Same gradient, memory flat
  in K, one extra encoder forward.

An encoder rank may also use the chunked recomputation on its own share
(`EncoderSide(recompute=True)`): DDP then syncs only on the last chunk.

Nothing here reads slides: pixels come from a `PixelFn` (slide id, patch
indices) -> (n, 3, S, S) float tensor, so the equivalence check feeds random
tensors and the trainer feeds patches.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common.errors import ConfigError, DataError, TrainingError

if TYPE_CHECKING:
    import torch

# (slide id, patch indices (n,)) -> pixels (n, 3, S, S) float on CPU, in index order
PixelFn = Callable[[str, np.ndarray], "torch.Tensor"]


# ----------------------------------------------------------------------------- tiles and shares


@dataclass(frozen=True, eq=False)
class Tiles:
    """An ordered list of tiles drawn from the slides of one bag.

    Attributes:
        slide_ids: the bag's slides.
        slide: (n,) position of each tile's slide in `slide_ids`.
        index: (n,) patch index of each tile within its slide (repeats allowed).
    """

    slide_ids: tuple[str, ...]
    slide: np.ndarray
    index: np.ndarray

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def __getitem__(self, item: slice) -> Tiles:
        return Tiles(self.slide_ids, self.slide[item], self.index[item])

    def chunks(self, size: int) -> list[Tiles]:
        """Consecutive pieces of at most `size` tiles (one empty piece for an empty list)."""
        n = len(self)
        return [self[i:i + size] for i in range(0, max(n, 1), size)]


def allocate(counts: Sequence[int], k: int) -> np.ndarray:
    """K tiles shared among a bag's slides in proportion to their patch counts (largest remainder).

    A slide bag gets all K; a patient bag (survival) spreads its K over its slides,
    so a step costs the same whatever the number of slides.
    """
    n = np.asarray(counts, dtype=np.int64)
    if n.ndim != 1 or n.size == 0 or (n <= 0).any():
        raise DataError(f"every slide of a bag needs at least one patch, got patch counts {n.tolist()}")
    exact = k * n / n.sum()
    out = np.floor(exact).astype(np.int64)
    rest = k - int(out.sum())
    if rest:
        out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def sample_tiles(slide_ids: Sequence[str], counts: Sequence[int], k: int, seed: int, epoch: int,
                 step: int) -> Tiles:
    """The K tiles of one training step, identical on every process (the distributed sampler).

    The random stream is derived from (seed, epoch, step) only, so every rank, a
    restarted job and the one-process reference draw the same tiles. A slide with
    at least as many patches as its share is sampled without replacement, a
    shorter one with replacement (GMA paper, section 3.2). Within a slide the
    indices are sorted so reads go through the slide in coordinate order.
    """
    rng = np.random.default_rng([int(seed), int(epoch), int(step)])
    per_slide = allocate(counts, k)
    slides, index = [], []
    for pos, (n, take) in enumerate(zip(counts, per_slide)):
        if take == 0:
            continue
        idx = np.sort(rng.choice(int(n), size=int(take), replace=bool(n < take)))
        slides.append(np.full(int(take), pos, dtype=np.int64))
        index.append(idx.astype(np.int64))
    return Tiles(tuple(slide_ids), np.concatenate(slides), np.concatenate(index))


def all_tiles(slide_ids: Sequence[str], counts: Sequence[int]) -> Tiles:
    """Every patch of every slide of a bag, in order (inference)."""
    slides = np.concatenate([np.full(int(n), p, dtype=np.int64) for p, n in enumerate(counts)])
    index = np.concatenate([np.arange(int(n), dtype=np.int64) for n in counts])
    return Tiles(tuple(slide_ids), slides, index)


def share_bounds(n: int, parts: int) -> np.ndarray:
    """(parts + 1,) bounds of `parts` contiguous shares of n items; the first n % parts get one more."""
    if parts < 1:
        raise ConfigError(f"need at least one encoder rank, got {parts}")
    sizes = np.full(parts, n // parts, dtype=np.int64)
    sizes[: n % parts] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def load_pixels(pixels: PixelFn, tiles: Tiles) -> torch.Tensor:
    """(n, 3, S, S) pixels of `tiles` in their order; each slide is read once per call, repeats expanded."""
    import torch

    parts: list[torch.Tensor] = []
    order: list[np.ndarray] = []
    for pos in np.unique(tiles.slide):
        where = np.flatnonzero(tiles.slide == pos)
        uniq, inverse = np.unique(tiles.index[where], return_inverse=True)
        x = pixels(tiles.slide_ids[int(pos)], uniq)  # (u, 3, S, S)
        if x.shape[0] != uniq.size:
            raise DataError(f"slide {tiles.slide_ids[int(pos)]!r}: asked for {uniq.size} patches, got {x.shape[0]}")
        parts.append(x[torch.as_tensor(inverse)])
        order.append(where)
    if len(parts) == 1:
        return parts[0]
    out = torch.cat(parts)  # grouped by slide
    return out[torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"))]  # back to tile order


# ----------------------------------------------------------------------------- the two sides


def _precision_ctx(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    from bench.evaluation.training import autocast

    return autocast(device, precision)


class EncoderSide:
    """One encoder process's part of a step (the whole encoder in chunked mode).

    Args:
        model: the encoder, wrapped in DDP on encoder ranks of a distributed job.
        pixels: where pixels come from.
        device: where the encoder runs.
        precision: autocast precision on CUDA ("fp32" or "bf16").
        chunk: tiles per encoder forward when recomputing (and at inference).
        recompute: encode without activations first and again with gradients in
            `backward` (chunked mode; memory flat in K). False keeps the graph of
            the whole share (the paper: one pass).
        scale: the pseudo-loss factor N (undoes DDP's averaging over N ranks); 1 without DDP.
        transform: applied to the pixels on the device (CUDA: the pixel source returns
            uint8 patches, normalised on the GPU); None when `pixels` returns them ready.
    """

    def __init__(self, model: torch.nn.Module, pixels: PixelFn, device: torch.device, dim: int, *,
                 precision: str = "fp32", chunk: int = 64, recompute: bool = False, scale: float = 1.0,
                 transform: Callable[[Any], Any] | None = None) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self.model = model
        self.raw = model.module if isinstance(model, DistributedDataParallel) else model
        self.is_ddp = isinstance(model, DistributedDataParallel)
        self.pixels = pixels
        self.device = device
        self.precision = precision
        self.chunk = int(chunk)
        self.recompute = recompute
        self.scale = float(scale)
        self.transform = transform
        self.dim = int(dim)
        # features travel in the parameters' dtype: float32, or float64 in the equivalence check
        self.dtype = next(self.raw.parameters()).dtype
        self._features: torch.Tensor | None = None
        self._tiles: Tiles | None = None
        self._next: Tiles | None = None
        self._ahead: tuple[Tiles, Any] | None = None
        self._pool: Any = None
        self.read_seconds = 0.0  # time spent reading or waiting for pixels

    def read_next(self, tiles: Tiles | None) -> None:
        """Read `tiles` (the next step's share) in a background thread once this step's pixels are in.

        The reads then overlap this step's encoding, communication and backward.
        One reader thread, and the training thread never reads while it runs,
        so the patch source is never used by two threads at once.
        """
        self._next = tiles

    def _load(self, tiles: Tiles) -> torch.Tensor:
        start = time.perf_counter()
        x = None
        if self._ahead is not None:
            ahead, future = self._ahead
            self._ahead = None
            pixels = future.result()  # also when it is not ours: no two reads at once
            if ahead.slide_ids == tiles.slide_ids and np.array_equal(ahead.slide, tiles.slide) \
                    and np.array_equal(ahead.index, tiles.index):
                x = pixels
        if x is None:
            x = load_pixels(self.pixels, tiles)
        if self._next is not None:
            from concurrent.futures import ThreadPoolExecutor

            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="gma-read")
            self._ahead = (self._next, self._pool.submit(load_pixels, self.pixels, self._next))
            self._next = None
        if self.transform is not None:  # uint8 pixels: copied as bytes, normalised on the device
            x = self.transform(x.to(self.device, non_blocking=True))
        x = x.to(self.device, dtype=self.dtype, non_blocking=True)
        self.read_seconds += time.perf_counter() - start
        return x

    def close(self) -> None:
        """Finish a pending read and stop the reader thread."""
        if self._ahead is not None:
            self._ahead[1].result()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _encode(self, model: torch.nn.Module, tiles: Tiles) -> torch.Tensor:
        with _precision_ctx(self.device, self.precision):
            out = model(self._load(tiles))  # (n, D)
        return out if out.dtype == self.dtype else out.to(self.dtype)  # bf16 under autocast -> fp32

    def encode_nograd(self, tiles: Tiles) -> torch.Tensor:
        """(n, D) features of `tiles` in chunks, no activations kept (recompute pass and inference)."""
        import torch

        if len(tiles) == 0:  # a rank whose share of a tiny slide is empty
            return torch.zeros(0, self.dim, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            return torch.cat([self._encode(self.raw, c) for c in tiles.chunks(self.chunk)])

    def forward(self, tiles: Tiles) -> torch.Tensor:
        """(n, D) features of this process's share, detached (what is sent to the aggregator)."""
        self._tiles = tiles
        if self.recompute:
            self._features = None
            return self.encode_nograd(tiles)
        self._features = self._encode(self.model, tiles)  # graph kept until `backward`
        return self._features.detach()

    def backward(self, grad: torch.Tensor) -> None:
        """Backpropagate the pseudo-loss scale * sum(f * g) for the share's feature gradient g (n, D)."""
        assert self._tiles is not None, "forward first"
        grad = grad.to(self.device)
        if not self.recompute:
            assert self._features is not None
            (self.scale * (self._features * grad).sum()).backward()
            self._features = None
            return
        pieces = self._tiles.chunks(self.chunk)
        start = 0
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            # DDP all-reduces on every backward; accumulate locally and sync once, on the last chunk
            sync = contextlib.nullcontext() if (last or not self.is_ddp) else self.model.no_sync()
            with sync:
                f = self._encode(self.model, piece)  # (c, D), with activations
                (self.scale * (f * grad[start:start + len(piece)]).sum()).backward()
            start += len(piece)
        self._tiles = None


@dataclass
class StepOutput:
    loss: float
    logits: Any  # (1, C) tensor, detached


def _full(x: torch.Tensor) -> torch.Tensor:
    """fp32 for a half-precision autocast output; float32/float64 unchanged."""
    import torch

    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class AggregatorSide:
    """Rank 0's part of a step: aggregator + task loss on the gathered (K, D) features."""

    def __init__(self, model: torch.nn.Module, task: Any, device: torch.device, precision: str = "fp32") -> None:
        self.model = model
        self.task = task
        self.device = device
        self.precision = precision
        self.aux_weight = float(getattr(model, "aux_weight", 0.0))

    def _label(self, target: Any) -> torch.Tensor | None:
        import torch

        if getattr(target, "label", None) is None:
            return None  # survival: targets are not classes, no auxiliary instance loss
        return torch.as_tensor(np.asarray(target.label), device=self.device).long().reshape(-1)  # (1,)

    def loss(self, features: torch.Tensor, target: Any) -> tuple[torch.Tensor, Any]:
        """Training loss of one bag (task loss, mixed with the aggregator's aux loss) and its output."""
        with _precision_ctx(self.device, self.precision):
            out = self.model(features.unsqueeze(0), label=self._label(target))  # (1, K, D) -> logits (1, C)
        loss = self.task.loss(_full(out.logits), target)
        if out.aux_loss is not None:
            loss = (1.0 - self.aux_weight) * loss + self.aux_weight * _full(out.aux_loss)
        return loss, out

    def step(self, features: torch.Tensor, target: Any) -> tuple[StepOutput, torch.Tensor]:
        """Forward + backward on detached features; returns the loss and d loss / d features (K, D)."""
        f = features.detach().to(self.device).requires_grad_(True)  # a leaf: the gather cut the graph
        loss, out = self.loss(f, target)
        loss.backward()
        assert f.grad is not None
        return StepOutput(float(loss.detach()), out.logits.detach()), f.grad


# ----------------------------------------------------------------------------- topologies


class LocalTopology:
    """One process plays both sides (chunked mode); exchanges are the identity."""

    rank = 0
    world_size = 1
    n_encoders = 1
    is_aggregator = True
    is_encoder = True
    distributed = False

    def __init__(self) -> None:
        self.comm_seconds = 0.0

    def begin_round(self) -> None:
        return None

    def mark(self, phase: int, what: str) -> None:
        return None

    def share(self, tiles: Tiles) -> Tiles:
        return tiles

    def gather(self, local: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return local

    def scatter(self, full: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return full

    def broadcast(self, obj: Any) -> Any:
        return obj

    def collect(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        return None


class DistTopology:
    """Rank 0 = aggregator, ranks 1..N = encoders, over the default (world) process group.

    Shares are contiguous slices of the step's tile list (`share_bounds`), so
    every rank knows every share's size without asking: the gather pads each
    share to the largest one (gloo needs equal sizes) and rank 0 drops the padding.
    Time spent inside the collectives, waiting for peers included, is added to
    `comm_seconds`. A collective that fails or exceeds the process group's
    timeout (a dead or hung peer) becomes a TrainingError naming this rank.
    """

    distributed = True

    def __init__(self, device: torch.device, feature_dim: int, dtype: Any = None) -> None:
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        if self.world_size < 2:
            raise ConfigError(f"GMA needs a world size >= 2 (1 aggregator + N encoder ranks), got {self.world_size}")
        self.n_encoders = self.world_size - 1
        self.is_aggregator = self.rank == 0
        self.is_encoder = self.rank > 0
        self.device = device
        self.feature_dim = int(feature_dim)  # D; rank 0 sizes its buffers with it (checked by `check_ranks`)
        self.dtype = dtype if dtype is not None else torch.float32
        self.comm_seconds = 0.0
        self.where = ""  # "epoch 2, step 5": for error messages
        # if set, the rank writes where it is into this file ("<round>\t<phase>\t<what>"): after a
        # hang the parent sees which rank fell behind the others (see e2e.gma.launch.job_error)
        self.progress_path: Any = None
        self._round = 0

    def begin_round(self) -> None:
        """A new step, inference call or exchange: every rank starts the same rounds in the same order."""
        self._round += 1

    def mark(self, phase: int, what: str) -> None:
        """Record that this rank entered `phase` (ordered within a round) of the current round."""
        if self.progress_path is not None:
            with contextlib.suppress(OSError):
                with open(self.progress_path, "w", encoding="utf-8") as f:
                    f.write(f"{self._round}\t{phase}\t{what}{' at ' + self.where if self.where else ''}\n")

    @contextlib.contextmanager
    def _timed(self, what: str, phase: int = 0):
        if phase == 0:
            self.begin_round()  # an exchange outside a step is a round of its own
        self.mark(phase, what)
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as exc:  # gloo/NCCL: peer closed the connection, or timed out waiting
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            err = TrainingError(
                f"rank {self.rank}: {what} failed{' at ' + self.where if self.where else ''}: {first} -- "
                "another rank died, hung past the timeout or failed (see its error)")
            err.communication = True  # type: ignore[attr-defined]  # a consequence, not the root cause
            raise err from None
        finally:
            self.comm_seconds += time.perf_counter() - start

    def _sizes(self, n: int) -> np.ndarray:
        return np.diff(share_bounds(n, self.n_encoders))

    def share(self, tiles: Tiles) -> Tiles:
        """This encoder rank's contiguous share of the tile list (empty on rank 0)."""
        b = share_bounds(len(tiles), self.n_encoders)
        if self.rank == 0:
            return tiles[0:0]
        return tiles[int(b[self.rank - 1]):int(b[self.rank])]

    def gather(self, local: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Encoder shares (n_r, D) -> (n, D) on rank 0 (None elsewhere), in tile order."""
        import torch

        sizes = self._sizes(n)
        m = int(sizes.max())
        send = torch.zeros(m, self.feature_dim, dtype=self.dtype, device=self.device)
        if local is not None and self.rank > 0:
            send[: local.shape[0]] = local
        recv = [torch.empty_like(send) for _ in range(self.world_size)] if self.rank == 0 else None
        with self._timed("gathering features", phase=2):
            self.dist.gather(send, recv, dst=0)
        if self.rank != 0:
            return None
        assert recv is not None
        return torch.cat([recv[r][: int(sizes[r - 1])] for r in range(1, self.world_size)])  # (n, D)

    def scatter(self, full: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Rank 0's (n, D) feature gradient -> each encoder rank's slice (n_r, D) (None on rank 0)."""
        import torch

        sizes = self._sizes(n)
        bounds = share_bounds(n, self.n_encoders)
        m = int(sizes.max())
        recv = torch.empty(m, self.feature_dim, dtype=self.dtype, device=self.device)
        send = None
        if self.rank == 0:
            assert full is not None
            full = full.to(self.dtype)
            send = [torch.zeros_like(recv)]
            for r in range(self.n_encoders):
                piece = torch.zeros_like(recv)
                piece[: int(sizes[r])] = full[int(bounds[r]):int(bounds[r + 1])]
                send.append(piece)
        with self._timed("scattering feature gradients", phase=4):
            self.dist.scatter(recv, send, src=0)
        return None if self.rank == 0 else recv[: int(sizes[self.rank - 1])]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (small Python values: metrics, stop flags)."""
        box = [obj if self.rank == 0 else None]
        with self._timed("broadcasting from rank 0"):
            self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def collect(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        with self._timed("exchanging rank information"):
            self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        with self._timed("waiting at a barrier"):
            self.dist.barrier()


def check_ranks(infos: Sequence[dict[str, Any]]) -> None:
    """Refuse to train when the ranks disagree (run on every rank with the same `infos`).

    Each info holds `rank`, `feature_dim` (what the encoder produces, or what the
    aggregator expects on rank 0) and `config_hash`. Every rank raises the same
    ConfigError, so the job stops before the first step instead of deadlocking
    or silently gathering misaligned features.
    """
    hashes = {i["config_hash"] for i in infos}
    if len(hashes) > 1:
        detail = ", ".join(f"rank {i['rank']}: {i['config_hash']}" for i in infos)
        raise ConfigError(f"the ranks run different configurations ({detail}); start every rank with the same job file")
    dims = {i["feature_dim"] for i in infos}
    if len(dims) > 1:
        detail = ", ".join(f"rank {i['rank']} {'expects' if i['rank'] == 0 else 'produces'} {i['feature_dim']}"
                           for i in infos)
        raise ConfigError(f"feature size differs between ranks ({detail}); every encoder rank must build the same "
                          "encoder and the aggregator must be built for its embedding size")


# ----------------------------------------------------------------------------- one step


def gma_step(topo: LocalTopology | DistTopology, tiles: Tiles, target: Any, encoder: EncoderSide | None,
             aggregator: AggregatorSide | None) -> StepOutput | None:
    """Forward and backward of one bag across the topology; no optimiser step.

    Afterwards every encoder rank holds the (DDP-averaged) encoder gradient and
    rank 0 the aggregator gradient, equal to a one-process backward of the same
    tiles. Returns the loss and logits on rank 0, None elsewhere.
    """
    topo.begin_round()
    local = topo.share(tiles)
    f_local = None
    if topo.is_encoder:
        topo.mark(1, "encoding its share")
        f_local = encoder.forward(local)  # (n_r, D)
    features = topo.gather(f_local, len(tiles))  # (K, D) on rank 0
    out, grad = None, None
    if topo.is_aggregator:
        topo.mark(3, "running the aggregator")
        out, grad = aggregator.step(features, target)
    g_local = topo.scatter(grad, len(tiles))  # (n_r, D) on encoder ranks
    if topo.is_encoder:
        topo.mark(5, "backpropagating the pseudo-loss")
        encoder.backward(g_local)
    return out


def encode_all(topo: LocalTopology | DistTopology, tiles: Tiles, encoder: EncoderSide | None) -> torch.Tensor | None:
    """Inference: every tile encoded without gradients, shares spread over the encoder ranks; (n, D) on rank 0."""
    topo.begin_round()
    local = topo.share(tiles)
    f_local = None
    if topo.is_encoder:
        topo.mark(1, "encoding (inference)")
        f_local = encoder.encode_nograd(local)
    return topo.gather(f_local, len(tiles))


# ----------------------------------------------------------------------------- BatchNorm


def has_batchnorm(model: torch.nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def set_train_mode(model: torch.nn.Module, batchnorm: str) -> None:
    """Train mode; with batchnorm="frozen" the BatchNorm layers stay in eval mode.

    Frozen BatchNorm normalises with its running statistics, a fixed per-tile
    affine map, so a tile's feature does not depend on which other tiles share
    its batch: the precondition of the gather/scatter equivalence (see README,
    "BatchNorm and GMA"). Its affine weights still train.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    model.train()
    if batchnorm == "frozen":
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
