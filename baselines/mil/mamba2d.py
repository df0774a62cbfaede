"""2DMamba (Zhang et al., CVPR 2025): a 2D selective state-space scan over the patch-feature grid.

Registry name `2dmamba` once registered in baselines/mil/__init__.py (the ABMILX paper's Table 1
baseline). Plain torch; the authors' CUDA kernel is optional (`scan_impl="cuda"` / `"auto"`).

Source (read, not copied): AtlasAnalyticsLab/2DMamba at commit 9fe12aaa866ddbb83b66acc4ef400abf8613ce6a,
`2DMambaMIL/models/MambaMIL_2D.py` (MambaMIL_2D), `2DMambaMIL/models/mamba_simple.py` (MambaConfig, Mamba,
ResidualBlock, MambaBlock.ssm_2d / selective_scan_2D, reconstruct_2d_wsi, RMSNorm),
`2DMambaMIL/models/pscan.py` (PScan_2D), `2DMambaMIL/models/pscan_2d.py` (the kernel's Python wrapper),
`cuda_kernel/include/selective_scan/selective_scan_fwd_kernel.cuh` (the kernel's two scans) and the
defaults of `2DMambaMIL/main.py`.

Path of one bag (the authors' module names, so their state dict loads unchanged)::

    h = Dropout(0.25)(GELU(Linear(in_dim, 128)(x)))                          `_fc1`        (N, 128)
    grid (H, W, 128): patch i at (row_i, col_i); every empty cell holds `layers.pad_token`
    n_layers x  grid = mixer(RMSNorm(grid)) + grid                            `layers.layers.k`
        mixer: x, z = in_proj(grid) (each 2*128 = 256 wide, no bias)
               x = SiLU(depthwise causal Conv1d(kernel 4) over the grid flattened row by row)
               dt, B, C = x_proj(x) split (dt_rank = ceil(128/16) = 8, d_state 16, 16)
               delta = softplus(dt_proj(dt)); A = -exp(A_log) (256, 16)
               y = 2D selective scan (below) + D * x;  out_proj(y * SiLU(z))
    grid = LayerNorm(grid); a = softmax over cells of Linear(128,1)(tanh(Linear(128,128)(grid)))
    logits = Linear(128, C)(sum_cells a * grid)

2D selective scan (paper Sec. 3, the kernel's horizontal-then-vertical scans; dA = exp(delta A),
dBx = delta * B * x, per channel e and state s)::

    hor[r, c] = dA[r, c] * hor[r, c-1] + dBx[r, c]          (hor[r, -1] = 0)
    h[r, c]   = dA[r, c] * h[r-1, c]   + hor[r, c]           (h[-1, c] = 0)
    y[r, c]   = sum_s C[r, c, s] * h[r, c, :, s]

On a one-row grid this is the 1D Mamba selective scan h[c] = dA[c] h[c-1] + dBx[c] (and so on one
column). `selective_scan_2d` runs it as a loop over the W columns (all rows, channels and states at
once), then over the H rows: H + W sequential steps, O(H W E S) work and memory per layer (the state
tensor (H, W, E, S) is materialised: at E = 256, S = 16 that is 4,096 numbers per cell, 16 MB per
1,000 cells in float32, a few times that with autograd). Measured here (2 shared CPU cores, float32,
the default config at in_dim 1024): forward + backward of one bag of 6,666 patches on a 100 x 100 grid
16 s, peak RSS 2.6 GB. `max_cells` guards against coords given in pixels instead of patch units.

Defaults (main.py): mambamil_dim 128, mambamil_layer 1, mambamil_state_dim 16, drop_out 0.25,
mamba_2d_pad_token 'trainable' (torch.rand init); MambaConfig: expand 2, d_conv 4, dt_rank 'auto',
bias False, conv_bias True, inner_layernorms False; pos_emb_type None; attention MLP hidden 128.
Every Linear is xavier-normal with zero bias (the authors' `initialize_weights`, applied after
MambaBlock's own init, so it also overrides their dt_proj init); A_log = log(1..16), D = 1.
Parameter count at in_dim 1024, 2 classes: _fc1 131,200 + LayerNorm 256 + pad token 128 + RMSNorm 128
+ in_proj 65,536 + conv1d 1,280 + x_proj 10,240 + dt_proj 2,304 + A_log 4,096 + D 256 + out_proj 32,768
+ attention 16,641 + classifier 258 = 265,091 (the authors' MambaMIL_2D built from their code: 265,091).

Attention: the method's own attention pooling weights. With `pool="grid"` (the authors') the softmax
runs over every grid cell, empty ones included, as in their code; `attention` reports the occupied
cells' weights renormalised to sum to 1 over the bag's patches (the empty cells' share is not
reported). With `pool="patches"` the softmax and the pooling run over the patches only.

Grid placement: cell = round(coords - the bag's minimum per axis); H x W is the bag's bounding box. (The
authors floor absolute level-0 coords // patch size; for patches on a regular grid both give the same
relative cells, and rounding after the shift is safe from the float32 round-off of coords / patch side.) Two patches in one cell are a
DataError (the authors' scatter keeps one of them silently). Padded instances never enter the grid;
each bag of a batch gets its own grid (the bags are processed one after another).

Departures from the authors: (1) the grid is each bag's bounding box; the authors place absolute
coords on a canvas fixed per dataset (e.g. BRACS 181272 x 88334 px / 512 -> 173 x 355 cells) whose
empty cells, pad tokens, all enter the scan, the raster conv and the pooling softmax; (2) the positional
embedding option (pos_emb_type 'linear', off by default) and inner_layernorms (off) are not built;
(3) batches of several bags (the authors take one bag).

Checked against the authors' code (float64, their MambaMIL_2D with random weights (init + 0.3 N(0, 1)),
copied by `load_state_dict(strict=True)`, trainable pad token, 2 layers, in_dim 32, d_model 16, 3 classes,
eval mode, pool="grid", their canvas set to the bag's bounding box, our coords offset by +7): max abs
logit difference 2.2e-15 on a 5 x 7 grid with 23 patches (8.9e-16 on 3 x 4, 1.8e-15 on 8 x 8, 1.3e-15
on 1 x 6 and 6 x 1). In that throw-away copy their `.float()` casts were removed (so it runs in
float64) and their Python `PScan_2D` was fixed: their released parallel scan reads the horizontally
scanned A in its vertical down-sweep, and so agrees with the recurrence above (and the kernel) only on
grids of at most 2 rows (measured on the scan alone: 1.0 max abs error on 3 x 4, 1e-16 on 1 x 5 and
2 x 8; with the vertical down-sweep reading the vertical stage's A, at most 9e-16 on grids up to
8 x 8). With their released scan the whole models agree to 9.3e-15 on a 2 x 7 grid and differ by 0.19
on 5 x 7. Their experiments use the CUDA kernel (their README's `--cuda_pscan`), whose forward runs the
two scans above. Gradients were not compared with theirs (their Python scan's backward is their own).

The CUDA kernel (`scan_impl="cuda"`, or `"auto"` where it imports): the authors' `v2dmamba_scan`
module (`cuda_kernel/build.sh`), called as their `pscan_2d.SelectiveScanFn` does
(fwd(u, delta, A, B, C, D, z, delta_bias, softplus, H, W, False), fused softplus and SiLU(z) gate).
It takes CUDA float32/float16 tensors; on others (CPU, float64) the plain-torch scan runs. Not run
here (no CUDA machine with the kernel built): only the call's plumbing is tested, against a stand-in
kernel computing the scan above (forward only; the kernel's backward is not). Without the kernel
`scan_impl="cuda"` raises `KernelUnavailable` (a ConfigError, `skip_run`), which `bench run` records
as a skipped method.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baselines.mil.base import MILAggregator, MILOutput, check_choice, check_int, check_prob, xavier_init
from bench.common.errors import ConfigError, DataError

KERNEL_MODULE = "v2dmamba_scan"  # the authors' compiled scan (pscan.so under v2dmamba_scan/)
MAMBA_MODULE = "mamba_ssm"
INSTALL = ("pip install -e '.[mamba2d]' (mamba-ssm), then build the authors' kernel: git clone "
           "https://github.com/AtlasAnalyticsLab/2DMamba && cd 2DMamba/cuda_kernel && bash build.sh "
           "(set -DPython_ROOT_DIR in build.sh; `import v2dmamba_scan` must work)")
SCAN_IMPLS = ("torch", "cuda", "auto")
POOLS = ("grid", "patches")
PAD_TOKENS = ("trainable", "zero")


class KernelUnavailable(ConfigError):
    """An optional GPU kernel is missing: the method cannot run on this machine (recorded as skipped)."""

    skip_run = True


def kernel_problem(importer: Callable[[str], object] = importlib.import_module) -> str | None:
    """Why the 2DMamba CUDA kernel cannot run here (None when CUDA, mamba-ssm and the kernel are all present)."""
    if not torch.cuda.is_available():
        return "2DMamba's selective-scan kernel is CUDA-only and no CUDA device is visible"
    for module, what in ((MAMBA_MODULE, "mamba-ssm"), (KERNEL_MODULE, "the 2DMamba CUDA kernel")):
        try:
            importer(module)
        except ImportError as exc:
            return f"{what} cannot be imported ({type(exc).__name__}: {exc})"
    return None


def require_kernel(importer: Callable[[str], object] = importlib.import_module) -> Any:
    """The authors' kernel module; raises `KernelUnavailable` with the reason and the install commands."""
    problem = kernel_problem(importer)
    if problem is not None:
        raise KernelUnavailable(f"aggregator '2dmamba' with scan_impl='cuda' cannot run here: {problem}. "
                                f"Use scan_impl='torch' (the plain-torch scan), or on a CUDA machine: {INSTALL}")
    return importer(KERNEL_MODULE)


# ---------------------------------------------------------------------------
# The 2D selective scan
# ---------------------------------------------------------------------------


def scan_2d(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """States of the 2D linear recurrence: a horizontal scan along each row, then a vertical one.

    hor[r, c] = decay[r, c] * hor[r, c-1] + inputs[r, c];  h[r, c] = decay[r, c] * h[r-1, c] + hor[r, c].

    Args:
        decay, inputs: (B, H, W, ...) with the same shape (the trailing dims are channels and states).
    Returns:
        h: (B, H, W, ...). W + H sequential steps, each vectorised over batch, the other axis and channels.
    """
    # unbind, not per-step slicing: the backward of a slice writes into a zero tensor of the full size,
    # W + H of them (quadratic); unbind's backward stacks the step gradients once
    # the scanned axis is moved to the front first, so that every step works on a contiguous slice
    decay_c = decay.movedim(2, 0).contiguous()  # (W, B, H, ...)
    state = torch.zeros_like(decay_c[0])
    columns = []
    for a_c, x_c in zip(decay_c.unbind(0), inputs.movedim(2, 0).contiguous().unbind(0)):
        state = a_c * state + x_c
        columns.append(state)
    hor = torch.stack(columns, dim=2)  # (B, H, W, ...)
    state = torch.zeros_like(hor[:, 0])
    rows = []
    for a_r, x_r in zip(decay.unbind(1), hor.unbind(1)):  # slices along H are contiguous already
        state = a_r * state + x_r
        rows.append(state)
    return torch.stack(rows, dim=1)


def selective_scan_2d(u: torch.Tensor, delta: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                      d: torch.Tensor) -> torch.Tensor:
    """2DMamba's selective scan (plain torch; zero-order-hold A, Euler B, as in the authors' code).

    Args:
        u: (B, H, W, E) inputs; delta: (B, H, W, E) step sizes (after softplus); a: (E, S) (negative);
        b, c: (B, H, W, S) input-dependent B and C; d: (E,) skip weights.
    Returns:
        y: (B, H, W, E) = sum_s c[..., s] * h[..., :, s] + d * u with h = scan_2d(exp(delta a), delta b u).
    """
    decay = torch.exp(delta.unsqueeze(-1) * a)  # (B, H, W, E, S)
    drive = delta.unsqueeze(-1) * b.unsqueeze(-2) * u.unsqueeze(-1)  # (B, H, W, E, S)
    h = scan_2d(decay, drive)
    return torch.einsum("bhwes,bhws->bhwe", h, c) + d * u


def _kernel_applies(x: torch.Tensor) -> bool:
    """Whether the authors' kernel takes `x`: CUDA float32/float16 (else the plain-torch scan runs)."""
    return x.is_cuda and x.dtype in (torch.float32, torch.float16)


class _KernelScan(torch.autograd.Function):
    """The authors' CUDA scan with fused softplus(delta + bias) and SiLU(z) gate (their SelectiveScanFn)."""

    @staticmethod
    def forward(ctx: Any, kernel: ModuleType, u: torch.Tensor, delta: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor,
                height: int, width: int) -> torch.Tensor:
        # u, delta, z: (B, E, H*W); b, c: (B, 1, S, H*W)
        out, states, *rest = kernel.fwd(u, delta, a, b, c, d, z, delta_bias, True, height, width, False)
        ctx.kernel, ctx.height, ctx.width = kernel, height, width
        ctx.save_for_backward(u, delta, a, b, c, d, z, delta_bias, states, out)
        return rest[0]

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:  # pragma: no cover - needs the kernel
        u, delta, a, b, c, d, z, delta_bias, states, out = ctx.saved_tensors
        du, ddelta, da, db, dc, dd, ddelta_bias, dz, *_ = ctx.kernel.bwd(
            u, delta, a, b, c, d, z, delta_bias, dout.contiguous(), states, out, None, True, False,
            ctx.height, ctx.width)
        return None, du, ddelta, da, db, dc, dd, dz, ddelta_bias, None, None


# ---------------------------------------------------------------------------
# Modules (the authors' names)
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (eps 1e-5, as in MambaConfig)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba2DMixer(nn.Module):
    """One Mamba block over a grid: in_proj, causal raster conv, 2D selective scan, SiLU(z) gate, out_proj."""

    def __init__(self, dim: int, d_state: int, expand: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        inner = expand * dim
        self.d_state, self.dt_rank, self.d_conv = d_state, dt_rank, d_conv
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, kernel_size=d_conv, groups=inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, grid: torch.Tensor, kernel: ModuleType | None = None) -> torch.Tensor:
        """grid: (B, H, W, dim) -> (B, H, W, dim)."""
        bs, height, width, _ = grid.shape
        x, z = self.in_proj(grid).chunk(2, dim=-1)  # (B, H, W, E) each
        seq = x.reshape(bs, height * width, -1).transpose(1, 2)  # (B, E, H*W), row by row
        seq = self.conv1d(seq)[:, :, : height * width]  # causal: each cell sees the d_conv-1 cells before it
        x = F.silu(seq.transpose(1, 2).reshape(bs, height, width, -1))
        dt, b, c = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        a = -torch.exp(self.A_log)
        if kernel is not None and _kernel_applies(x):
            flat = lambda t: t.reshape(bs, height * width, -1).transpose(1, 2).contiguous()  # noqa: E731
            delta = self.dt_proj.weight @ flat(dt)  # (B, E, H*W); bias and softplus fused in the kernel
            y = _KernelScan.apply(kernel, flat(x), delta.contiguous(), a.float().contiguous(),
                                  flat(b).unsqueeze(1), flat(c).unsqueeze(1), self.D.float().contiguous(), flat(z),
                                  self.dt_proj.bias.float().contiguous(), height, width)
            return self.out_proj(y.transpose(1, 2).reshape(bs, height, width, -1))
        delta = F.softplus(self.dt_proj(dt))  # (B, H, W, E)
        y = selective_scan_2d(x, delta, a, b, c, self.D)
        return self.out_proj(y * F.silu(z))


class ResidualBlock(nn.Module):
    """grid + mixer(RMSNorm(grid))."""

    def __init__(self, dim: int, d_state: int, expand: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        self.mixer = Mamba2DMixer(dim, d_state, expand, d_conv, dt_rank)
        self.norm = RMSNorm(dim)

    def forward(self, grid: torch.Tensor, kernel: ModuleType | None = None) -> torch.Tensor:
        return self.mixer(self.norm(grid), kernel) + grid


class Mamba2DStack(nn.Module):
    """The pad token of empty cells and the residual blocks (the authors' `Mamba`)."""

    def __init__(self, dim: int, n_layers: int, d_state: int, expand: int, d_conv: int, dt_rank: int,
                 pad_token: str) -> None:
        super().__init__()
        trainable = pad_token == "trainable"
        self.pad_token = nn.Parameter(torch.rand(dim) if trainable else torch.zeros(dim), requires_grad=trainable)
        self.layers = nn.ModuleList(ResidualBlock(dim, d_state, expand, d_conv, dt_rank) for _ in range(n_layers))

    def forward(self, grid: torch.Tensor, kernel: ModuleType | None = None) -> torch.Tensor:
        for layer in self.layers:
            grid = layer(grid, kernel)
        return grid


# ---------------------------------------------------------------------------
# The aggregator
# ---------------------------------------------------------------------------


class Mamba2DMIL(MILAggregator):
    """2DMambaMIL: projection, 2D Mamba blocks over the patch grid, attention pooling over the grid cells."""

    permutation_invariant = False
    uses_coords = True

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 128,
        n_layers: int = 1,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        dropout: float = 0.25,
        attn_dim: int = 128,
        pad_token: str = "trainable",
        pool: str = "grid",
        scan_impl: str = "torch",
        max_cells: int = 1_000_000,
    ) -> None:
        """Args (defaults from the authors' main.py / MambaConfig, see the module docstring):
            hidden_dim: mambamil_dim; n_layers: mambamil_layer; d_state: mambamil_state_dim;
            expand, d_conv, dt_rank ('auto' = ceil(hidden_dim / 16)): MambaConfig;
            dropout: after the input projection; attn_dim: the attention MLP's hidden size;
            pad_token: 'trainable' (torch.rand init) or 'zero' (frozen zeros) for empty grid cells;
            pool: 'grid' (softmax over every cell, the authors') or 'patches' (over the patches only);
            scan_impl: 'torch' (plain torch), 'cuda' (the authors' kernel, KernelUnavailable without it),
                'auto' (the kernel where it imports, else torch);
            max_cells: largest bounding box H * W accepted per bag.
        """
        super().__init__(in_dim, n_outputs, hidden_dim)
        self.scan_impl = check_choice("scan_impl", scan_impl, SCAN_IMPLS)
        self.pool = check_choice("pool", pool, POOLS)
        self.max_cells = check_int("max_cells", max_cells)
        if dt_rank == "auto":
            dt_rank = math.ceil(hidden_dim / 16)
        elif isinstance(dt_rank, str):
            raise ConfigError(f"dt_rank must be a positive integer or 'auto', got {dt_rank!r}")
        dropout = check_prob("dropout", dropout)
        if self.scan_impl == "cuda":
            require_kernel()
        # a flag, not the module: the model stays picklable and deep-copyable
        self.uses_kernel = self.scan_impl == "cuda" or (self.scan_impl == "auto" and kernel_problem() is None)

        fc1: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        if dropout > 0:
            fc1.append(nn.Dropout(dropout))
        self._fc1 = nn.Sequential(*fc1)
        self.norm = nn.LayerNorm(hidden_dim)
        self.layers = Mamba2DStack(hidden_dim, check_int("n_layers", n_layers), check_int("d_state", d_state),
                                   check_int("expand", expand), check_int("d_conv", d_conv),
                                   check_int("dt_rank", dt_rank), check_choice("pad_token", pad_token, PAD_TOKENS))
        self.attention = nn.Sequential(nn.Linear(hidden_dim, check_int("attn_dim", attn_dim)), nn.Tanh(),
                                       nn.Linear(attn_dim, 1))
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        xavier_init(self)  # the authors' initialize_weights: every Linear, dt_proj included

    def grid_cells(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Rows, columns (N,) long and the bounding box (H, W) of one bag's patches; coords (N, 2) = (column, row)."""
        cells = torch.round(coords.detach() - coords.detach().min(dim=0).values).long()  # (N, 2)
        cols, rows = cells[:, 0], cells[:, 1]
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        if height * width > self.max_cells:
            raise DataError(f"2dmamba: the bag's patch grid is {height} x {width} = {height * width} cells, more than "
                            f"max_cells={self.max_cells}; coords must be in patch units (level-0 pixels / patch "
                            "level-0 side), or raise max_cells")
        flat = rows * width + cols
        if int(torch.unique(flat).numel()) != flat.numel():
            raise DataError("2dmamba: two patches of one bag fall in the same grid cell (overlapping patches or "
                            "coords not in patch units); 2DMamba needs one patch per cell")
        return rows, cols, height, width

    def forward_bag(self, x: torch.Tensor, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag: x (N, D), coords (N, 2) -> logits (C,), attention (N,) summing to 1."""
        rows, cols, height, width = self.grid_cells(coords)
        h = self._fc1(x)  # (N, L)
        grid = self.layers.pad_token.to(h.dtype).expand(height, width, -1)
        grid = grid.index_put((rows, cols), h).unsqueeze(0)  # (1, H, W, L)
        kernel = importlib.import_module(KERNEL_MODULE) if self.uses_kernel else None
        grid = self.norm(self.layers(grid, kernel))[0]  # (H, W, L)
        scores = self.attention(grid).squeeze(-1)  # (H, W)
        if self.pool == "grid":
            weights = torch.softmax(scores.reshape(-1), dim=0)  # (H*W,)
            z = weights @ grid.reshape(height * width, -1)
            attention = weights.reshape(height, width)[rows, cols]
            attention = attention / attention.sum()
        else:
            attention = torch.softmax(scores[rows, cols], dim=0)  # (N,)
            z = attention @ grid[rows, cols]
        return self.classifier(z), attention

    def aggregate(self, x: torch.Tensor, mask: torch.Tensor | None, label: torch.Tensor | None,
                  coords: torch.Tensor | None = None) -> MILOutput:
        """x (B, N, D), mask (B, N) or None, coords (B, N, 2) -> logits (B, C), attention (B, N)."""
        if coords is None:  # forward() refuses a missing coords first; this is for direct calls
            raise DataError("Mamba2DMIL needs the patches' grid positions: coords=(B, N, 2) (column, row)")
        logits, attention = [], torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for i in range(x.shape[0]):
            valid = mask[i] if mask is not None else torch.ones(x.shape[1], dtype=torch.bool, device=x.device)
            bag_logits, bag_attention = self.forward_bag(x[i, valid], coords[i, valid])
            logits.append(bag_logits)
            attention[i, valid] = bag_attention
        return MILOutput(logits=torch.stack(logits), attention=attention)


__all__ = ["KernelUnavailable", "Mamba2DMIL", "kernel_problem", "require_kernel", "scan_2d", "selective_scan_2d",
           "KERNEL_MODULE", "INSTALL"]
