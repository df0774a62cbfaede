"""`bench check-gma`: the GMA paper's gradient-equivalence experiment (section 3.1) as a command.

A small deterministic encoder (conv + linear + ReLU) and the registered GMA
aggregator (dropout 0) train for a few steps on random "slides" (tensors, no
files) four ways:

- **reference**: one process, all K tiles in one forward with gradients (plain E2E);
- **chunked**: one process, `gma_step` on a `LocalTopology` (encode in chunks
  without activations, aggregator on the full (K, D) matrix, re-encode each chunk);
- **1+N processes**: `gma_step` on a `DistTopology` under torchrun with gloo,
  the encoder in DDP (N = 2 and 3 by default), once keeping the graph of each
  share (the paper) and once re-encoding each share in chunks.

K = 7 is divisible by neither 2 nor 3 (uneven shares), and one toy slide is
shorter than K (sampling with replacement). After every step the loss, every
gradient and (after the optimiser step) every parameter is compared with the
reference: the largest relative difference max|a - b| / max|b| over tensors and
steps. In float64 all must be <= 1e-10; the float32 figures are printed too.

With ``batchnorm="plain"`` the toy encoder gets a BatchNorm layer using batch
statistics, and the check shows why plain BatchNorm breaks the equivalence.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.errors import ConfigError

TOLERANCE = 1e-10


@dataclass(frozen=True)
class CheckProblem:
    """The toy problem: sizes, steps, dtype and the toy encoder's BatchNorm."""

    dtype: str = "float64"
    steps: int = 4
    tiles: int = 7  # K per step: uneven shares for N = 2 and 3
    slides: tuple[int, ...] = (5, 11, 9)  # patches per toy slide; 5 < K: drawn with replacement
    image_size: int = 8
    dim: int = 12  # feature size D
    chunk: int = 3  # tiles per chunk (chunked mode and re-encoding shares)
    lr: float = 0.05
    seed: int = 0
    batchnorm: str = "none"  # "none" | "frozen" (eval-mode BN) | "plain" (batch statistics: not equivalent)

    def __post_init__(self) -> None:
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"check dtype must be float64 or float32, got {self.dtype!r}")
        if self.batchnorm not in ("none", "frozen", "plain"):
            raise ConfigError(f"check batchnorm must be none, frozen or plain, got {self.batchnorm!r}")
        for key in ("steps", "tiles", "image_size", "dim", "chunk"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"check {key} must be >= 1, got {getattr(self, key)!r}")
        object.__setattr__(self, "slides", tuple(int(n) for n in self.slides))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "slides": list(self.slides)}

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


# ----------------------------------------------------------------------------- the toy problem


def toy_encoder(problem: CheckProblem) -> Any:
    """Conv(3->6) [+ BatchNorm] + ReLU + global mean + Linear + ReLU + Linear -> (B, dim), seeded."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(problem.seed)
        layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1)]
        if problem.batchnorm != "none":
            layers.append(nn.BatchNorm2d(6))
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 16), nn.ReLU(),
                   nn.Linear(16, problem.dim)]
        model = nn.Sequential(*layers)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics and affine weights
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
    return model.to(problem.torch_dtype)


def toy_aggregator(problem: CheckProblem) -> Any:
    """The registered GMA aggregator without dropout (as in the paper's check), in the problem's dtype."""
    from baselines.mil import build_aggregator

    return build_aggregator("gma", in_dim=problem.dim, n_outputs=2, seed=problem.seed + 1,
                            dropout=0.0).to(problem.torch_dtype)


def toy_pixels(problem: CheckProblem) -> Any:
    """PixelFn over random slides: slide `s<i>` has problem.slides[i] tiles of (3, S, S) noise."""
    import torch

    cache: dict[str, torch.Tensor] = {}

    def pixels(slide_id: str, indices: np.ndarray) -> torch.Tensor:
        if slide_id not in cache:
            i = int(slide_id[1:])
            g = torch.Generator().manual_seed(problem.seed * 1000 + i)
            cache[slide_id] = torch.rand(problem.slides[i], 3, problem.image_size, problem.image_size,
                                         generator=g, dtype=torch.float64).to(problem.torch_dtype)
        return cache[slide_id][torch.as_tensor(indices)]

    return pixels


def toy_steps(problem: CheckProblem) -> list[tuple[Any, Any]]:
    """(tiles, target) of every step: slides in turn, labels alternating."""
    from bench.evaluation.tasks import Targets
    from e2e.gma.core import sample_tiles

    out = []
    for i in range(problem.steps):
        s = i % len(problem.slides)
        tiles = sample_tiles([f"s{s}"], [problem.slides[s]], problem.tiles, problem.seed, 0, i)
        out.append((tiles, Targets(label=np.array([i % 2], dtype=np.int64))))
    return out


def _task() -> Any:
    from bench.evaluation.tasks import make_task

    return make_task("classification", classes=("a", "b"))


def _optimizers(encoder: Any, aggregator: Any, problem: CheckProblem) -> list[Any]:
    """SGD with momentum and weight decay on both sides.

    Not AdamW: the gated attention's last bias has a gradient that is exactly
    zero in exact arithmetic (softmax ignores a shift of all scores), so every
    run computes round-off noise there, and Adam, dividing by the root of that
    noise's square, turns it into parameter steps of size lr in arbitrary
    directions. That would measure Adam, not the gather/scatter: SGD keeps a
    parameter step proportional to its gradient.
    """
    from bench.evaluation.training import make_optimizer

    opts = []
    for model in (encoder, aggregator):
        if model is not None:
            opts.append(make_optimizer("sgd", model.parameters(), problem.lr, weight_decay=1e-2))
    return opts


def _record(rec: dict[str, Any], step: int, what: str, model: Any, name: str) -> None:
    for pname, p in model.named_parameters():
        value = p.grad if what == "grad" else p
        if value is not None:
            rec[f"{step}/{what}/{name}/{pname}"] = value.detach().clone().cpu()


def _train_mode(encoder: Any, problem: CheckProblem) -> None:
    from e2e.gma.core import set_train_mode

    set_train_mode(encoder, "frozen" if problem.batchnorm == "frozen" else "none")


# ----------------------------------------------------------------------------- one-process runs


def run_reference(problem: CheckProblem) -> dict[str, Any]:
    """Plain single-process training: all K tiles in one forward with gradients."""
    import torch

    from e2e.gma.core import load_pixels

    encoder, aggregator, task, pixels = toy_encoder(problem), toy_aggregator(problem), _task(), toy_pixels(problem)
    _train_mode(encoder, problem)
    opts = _optimizers(encoder, aggregator, problem)
    rec: dict[str, Any] = {}
    for i, (tiles, target) in enumerate(toy_steps(problem)):
        for o in opts:
            o.zero_grad(set_to_none=True)
        f = encoder(load_pixels(pixels, tiles))  # (K, D)
        out = aggregator(f.unsqueeze(0), label=torch.as_tensor(target.label))  # (1, K, D) -> (1, 2)
        loss = task.loss(out.logits, target)
        loss.backward()
        rec[f"{i}/loss"] = loss.detach().reshape(1).clone()
        _record(rec, i, "grad", encoder, "encoder")
        _record(rec, i, "grad", aggregator, "aggregator")
        for o in opts:
            o.step()
        _record(rec, i, "param", encoder, "encoder")
        _record(rec, i, "param", aggregator, "aggregator")
    return rec


def run_chunked(problem: CheckProblem) -> dict[str, Any]:
    """The chunked mode: `gma_step` on one process (`LocalTopology`, recomputation in chunks)."""
    import torch

    from e2e.gma.core import AggregatorSide, EncoderSide, LocalTopology, gma_step

    encoder, aggregator = toy_encoder(problem), toy_aggregator(problem)
    _train_mode(encoder, problem)
    cpu = torch.device("cpu")
    enc = EncoderSide(encoder, toy_pixels(problem), cpu, problem.dim, chunk=problem.chunk, recompute=True)
    agg = AggregatorSide(aggregator, _task(), cpu)
    opts = _optimizers(encoder, aggregator, problem)
    rec: dict[str, Any] = {}
    for i, (tiles, target) in enumerate(toy_steps(problem)):
        for o in opts:
            o.zero_grad(set_to_none=True)
        out = gma_step(LocalTopology(), tiles, target, enc, agg)
        assert out is not None
        rec[f"{i}/loss"] = torch.tensor([out.loss], dtype=problem.torch_dtype)
        _record(rec, i, "grad", encoder, "encoder")
        _record(rec, i, "grad", aggregator, "aggregator")
        for o in opts:
            o.step()
        _record(rec, i, "param", encoder, "encoder")
        _record(rec, i, "param", aggregator, "aggregator")
    return rec


# ----------------------------------------------------------------------------- the distributed run (rank side)


def run_rank(job: dict[str, Any]) -> None:
    """One rank of a check job: every run of job["runs"] (dtype, recompute) in turn, same process group.

    Rank 0 writes the aggregator's records, rank 1 the encoder's (DDP keeps the
    encoder ranks identical; the others check that theirs match rank 1's).
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.evaluation.training import save_safetensors
    from e2e.gma.core import AggregatorSide, DistTopology, EncoderSide, check_ranks, gma_step
    from e2e.gma.launch import EventLog, ensure_launcher, init_distributed, inject_fault, progress_file

    torch.set_num_threads(1)
    device, _ = init_distributed("gloo", float(job["timeout_s"]), "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(job["out"])
    events = EventLog(out_dir / "events.jsonl" if rank == 0 else None, min_interval=0.0)
    group = dist.new_group(ranks=list(range(1, world)))
    fault = job.get("fault")
    for r, run in enumerate(job["runs"]):
        problem = CheckProblem(**{**job["problem"], "dtype": run["dtype"], "slides": tuple(job["problem"]["slides"])})
        dim = problem.dim + (1 if fault and fault.get("kind") == "feature_dim" and fault.get("rank") == rank else 0)
        topo = DistTopology(device, problem.dim, problem.torch_dtype)
        topo.progress_path = progress_file(out_dir, rank)
        infos = topo.collect({"rank": rank, "feature_dim": dim, "config_hash": job["problem_hash"]})
        check_ranks(infos)  # every rank raises the same error before the first step
        encoder = aggregator = None
        enc = agg = None
        if rank == 0:
            aggregator = toy_aggregator(problem)
            agg = AggregatorSide(aggregator, _task(), device)
        else:
            encoder = toy_encoder(problem)
            _train_mode(encoder, problem)
            ddp = DistributedDataParallel(encoder, process_group=group)
            enc = EncoderSide(ddp, toy_pixels(problem), device, problem.dim, chunk=problem.chunk,
                              recompute=bool(run["recompute"]), scale=world - 1)
        opts = _optimizers(encoder, aggregator, problem)
        rec: dict[str, Any] = {}
        for i, (tiles, target) in enumerate(toy_steps(problem)):
            ensure_launcher(job)  # the launcher is gone: stop (LauncherGone), write nothing
            inject_fault(fault, rank, r, i)
            topo.where = f"run {r}, step {i}"
            for o in opts:
                o.zero_grad(set_to_none=True)
            out = gma_step(topo, tiles, target, enc, agg)
            if rank == 0:
                assert out is not None
                rec[f"{i}/loss"] = torch.tensor([out.loss], dtype=problem.torch_dtype)
                _record(rec, i, "grad", aggregator, "aggregator")
            elif encoder is not None:
                _record(rec, i, "grad", encoder, "encoder")
            for o in opts:
                o.step()
            _record(rec, i, "param", aggregator if rank == 0 else encoder, "aggregator" if rank == 0 else "encoder")
            events.write("heartbeat", run=r, step=i)
        if rank > 0:  # DDP must have kept the encoder ranks identical
            mine = {k: v for k, v in rec.items()}
            first = topo.collect(mine if rank == 1 else None)[1]
            worst = max(float((mine[k] - first[k]).abs().max()) for k in mine)
            if worst != 0.0:
                raise RuntimeError(f"encoder rank {rank} differs from rank 1 by {worst:g} after DDP steps")
        else:
            topo.collect(None)
        if rank in (0, 1):
            ensure_launcher(job, check_job_file=True)
            save_safetensors(out_dir / f"run{r}-rank{rank}.safetensors", rec)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- comparison and report


def max_relative(a: dict[str, Any], b: dict[str, Any], kind: str) -> float:
    """Largest relative difference of one kind ("grad", "param", "loss") of record `a` against `b`.

    Per step and model, max|a - b| over all its tensors divided by max|b| over
    them (normwise, as the paper's normalised norms of whole layers): a tensor
    whose true value is zero, such as the attention's last bias gradient, then
    counts by its round-off against the model's scale rather than against itself.
    """
    groups: dict[str, list[str]] = {}
    for k in b:
        parts = k.split("/")
        if parts[1] == kind:
            groups.setdefault("/".join(parts[:3]), []).append(k)
    if not groups:
        raise AssertionError(f"no {kind} records to compare")
    worst = 0.0
    for keys in groups.values():
        missing = [k for k in keys if k not in a]
        if missing:
            raise AssertionError(f"record {missing[0]} missing from the compared run")
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
        scale = max(float(b[k].double().abs().max()) for k in keys)
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


@dataclass(frozen=True)
class CheckRow:
    run: str
    dtype: str
    grad: float
    param: float
    loss: float

    @property
    def worst(self) -> float:
        return max(self.grad, self.param, self.loss)


@dataclass
class CheckReport:
    """Largest relative differences of each run against the one-process reference."""

    problem: CheckProblem
    rows: list[CheckRow] = field(default_factory=list)
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        """Every float64 run within the tolerance (float32 rows are reported, not judged)."""
        rows = [r for r in self.rows if r.dtype == "float64"]
        return bool(rows) and all(math.isfinite(r.worst) and r.worst <= self.tolerance for r in rows)

    def to_text(self) -> str:
        from tabulate import tabulate

        table = [[r.run, r.dtype, f"{r.grad:.2e}", f"{r.param:.2e}", f"{r.loss:.2e}",
                  ("ok" if r.worst <= self.tolerance else "FAIL") if r.dtype == "float64" else "(reported)"]
                 for r in self.rows]
        p = self.problem
        head = (f"GMA gradient equivalence: {p.steps} SGD steps, K={p.tiles} tiles per step, slides of "
                f"{list(p.slides)} tiles, D={p.dim}, chunk={p.chunk}, toy encoder BatchNorm: {p.batchnorm}\n"
                "largest relative difference max|x - ref| / max|ref| against one process with all K tiles:")
        verdict = (f"PASS: every float64 run within {self.tolerance:g}" if self.passed
                   else f"FAIL: a float64 run differs by more than {self.tolerance:g}")
        return "\n".join([head, tabulate(table, headers=["run", "dtype", "gradients", "parameters", "loss", ""]),
                          verdict])

    def to_dict(self) -> dict[str, Any]:
        return {"problem": self.problem.to_dict(), "tolerance": self.tolerance, "passed": self.passed,
                "rows": [asdict(r) for r in self.rows]}


def _row(name: str, dtype: str, got: dict[str, Any], ref: dict[str, Any]) -> CheckRow:
    return CheckRow(name, dtype, max_relative(got, ref, "grad"), max_relative(got, ref, "param"),
                    max_relative(got, ref, "loss"))


def check_gma(nproc: Sequence[int] = (3, 4), dtypes: Sequence[str] = ("float64", "float32"), *,
              problem: CheckProblem | None = None, recompute: bool = True, timeout_s: float = 120.0,
              workdir: Path | None = None, echo: bool = False, fault: dict[str, Any] | None = None) -> CheckReport:
    """Run the equivalence experiment; see the module docstring.

    Args:
        nproc: world sizes of the distributed runs (1 aggregator + N encoder
            ranks: 3 and 4 are N = 2 and 3).
        dtypes: "float64" (judged against `TOLERANCE`) and/or "float32" (reported).
        recompute: also run each world size with per-rank chunked recomputation.
        timeout_s: collective timeout of the ranks; the job cannot hang longer.
        workdir: where the job files go (a temporary folder by default).
        fault: test hook passed to the ranks (see `e2e.gma.launch.inject_fault`).
    """
    from bench.common.files import config_hash
    from bench.evaluation.training import load_safetensors
    from e2e.gma.launch import run_job

    base = problem or CheckProblem()
    for n in nproc:
        if int(n) < 2:
            raise ConfigError(f"distributed runs need a world size >= 2 (1 aggregator + N encoder ranks), got {n}")
        if base.tiles < int(n) - 1:
            raise ConfigError(f"K={base.tiles} tiles cannot be shared among {int(n) - 1} encoder ranks")
    report = CheckReport(base)
    refs = {}
    for dtype in dtypes:
        p = replace(base, dtype=dtype)
        refs[dtype] = run_reference(p)
        report.rows.append(_row(f"chunked (chunk {p.chunk})", dtype, run_chunked(p), refs[dtype]))
    runs = [{"dtype": d, "recompute": rc} for d in dtypes for rc in ((False, True) if recompute else (False,))]
    with tempfile.TemporaryDirectory(prefix="gma-check-", dir=workdir) as tmp:
        for n in nproc:
            folder = Path(tmp) / f"nproc{n}"
            # `out` as given (a relative workdir included): run_job writes every path of the job absolute
            job = {"kind": "check", "problem": base.to_dict(), "problem_hash": config_hash(base.to_dict()),
                   "runs": runs, "out": str(folder), "timeout_s": timeout_s, "fault": fault}
            run_job(job, folder, int(n), timeout_s=timeout_s, echo=echo)
            for r, run in enumerate(runs):
                got = {**load_safetensors(folder / f"run{r}-rank0.safetensors")[0],
                       **load_safetensors(folder / f"run{r}-rank1.safetensors")[0]}
                name = f"1+{int(n) - 1} processes (gloo)" + (f", shares re-encoded in chunks of {base.chunk}"
                                                             if run["recompute"] else "")
                report.rows.append(_row(name, run["dtype"], got, refs[run["dtype"]]))
    report.rows.sort(key=lambda r: (r.dtype != "float64", r.run))
    return report
