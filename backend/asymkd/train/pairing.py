"""Pairing RGB samples with MS partners, and re-pairing by the teacher/student KL.

Every RGB sample gets one MS partner: of its own class when it is labeled, of any class
when it is unlabeled (label -1). The constraint makes the problem split into one block
per class (labeled RGB rows of class c x MS columns of class c) plus one block of the
unlabeled rows against every MS column; nothing outside these blocks is ever computed.

- `PAIRING`: the pairing methods by name, each a first assignment and a re-pairing.
- `assign_pairs`: from a matcher similarity matrix, by nearest neighbour, balanced or random.
- `repair_by_kl`: argmin_j KL(t_j || s_i) as one GEMM per block chunk.
- `repair_by_kl_balanced`: the same costs fed to the balanced assignment.
- Balanced = entropic optimal transport (Sinkhorn, log domain): each RGB row has mass 1,
  and within each class every MS column receives the same mass, so no MS sample becomes a
  hub that most RGB samples take. Rows are then rounded to the plan's argmax.
- `pairing_stats`: how concentrated an assignment is (distinct MS used, max share, Gini).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..choices import PAIRING_METHODS
from ..data.patches import check_known_classes
from ..errors import DataError

ArrayLike = np.ndarray | torch.Tensor | Sequence[int] | Sequence[float]
# Student log-probabilities below this are treated as this (a probability of e^-10000 is 0
# anyway); it keeps 0 * log(0) out of the GEMM, where it would be NaN.
MIN_LOGP = -1e4
# Sinkhorn runs its blocks on several threads from this many scores on.
SINKHORN_PARALLEL_ENTRIES = 1 << 20


@dataclass(frozen=True)
class Block:
    """RGB rows and MS columns that may be paired: one class, or the unlabeled rows x all MS."""
    rows: torch.Tensor  # (n,) int64 RGB indices
    cols: torch.Tensor  # (m,) int64 MS indices


def _labels(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class ids, got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def check_classes(rgb_labels: ArrayLike, ms_labels: ArrayLike,
                  class_names: Sequence[str] | None = None) -> None:
    """Raise DataError if an RGB class has no MS sample, or an MS sample has no class."""
    rgb, ms = _labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")
    if len(ms) == 0:
        raise DataError("there are no MS samples to pair with",
                        "give an MS dataset with at least one labeled patch per class")
    if (ms < 0).any():
        raise DataError(f"{int((ms < 0).sum())} MS samples have no class label",
                        "MS samples are the teacher's training set and must all be labeled")
    def name(c: int) -> str:
        return class_names[c] if class_names is not None and c < len(class_names) else str(c)

    check_known_classes([name(c) for c in np.unique(rgb[rgb >= 0])], [name(c) for c in np.unique(ms)], "the RGB set")


def class_blocks(rgb_labels: ArrayLike, ms_labels: ArrayLike) -> list[Block]:
    """The allowed (rows, cols) blocks: one per class with labeled RGB rows, plus unlabeled x all."""
    check_classes(rgb_labels, ms_labels)
    rgb, ms = _labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")
    blocks = []
    for c in np.unique(rgb[rgb >= 0]):
        blocks.append(Block(torch.from_numpy(np.flatnonzero(rgb == c)), torch.from_numpy(np.flatnonzero(ms == c))))
    unlabeled = np.flatnonzero(rgb < 0)
    if len(unlabeled):
        blocks.append(Block(torch.from_numpy(unlabeled), torch.arange(len(ms))))
    return blocks


def _as_float(x: ArrayLike) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().float()


def _default_chunk(n_cols: int, entries: int = 1 << 19) -> int:
    # ~2 MB of float32 scores per GEMM: big enough for an efficient GEMM, small enough
    # to stay in cache while the row maxima are taken.
    return max(64, entries // max(n_cols, 1))


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _blockwise_argmax(blocks: list[Block], n_rows: int,
                      score: Callable[[Block], Callable[[int, int], torch.Tensor]],
                      chunk: int | None, workers: int | None = None,
                      device: torch.device | None = None) -> tuple[np.ndarray, torch.Tensor]:
    """Row-wise argmax of block scores; `score(block)(start, stop)` gives the scores of the
    block's rows start:stop against all its columns.

    On CPU the chunks run on `workers` threads (default: torch's thread count), each with
    single-threaded torch ops. Why: with small K every GEMM is short, and torch's own
    parallel regions then wait at a barrier for every chunk; on a busy CPU (another job on
    the same cores) a descheduled thread stalls each barrier and a 0.1 s job took 3-9 s.
    Independent chunks per thread do not wait for each other.
    """
    assign = torch.full((n_rows,), -1, dtype=torch.int64)
    best = torch.full((n_rows,), float("-inf"))
    tasks: list[tuple[Block, Callable[[int, int], torch.Tensor], int, int]] = []
    for block in blocks:
        block_score = score(block)
        step = chunk or _default_chunk(len(block.cols))
        tasks += [(block, block_score, start, min(start + step, len(block.rows)))
                  for start in range(0, len(block.rows), step)]

    def run(task: tuple[Block, Callable[[int, int], torch.Tensor], int, int]) -> None:
        block, block_score, start, stop = task
        values, idx = block_score(start, stop).max(dim=1)
        rows = block.rows[start:stop]  # disjoint between tasks: safe to write concurrently
        assign[rows] = block.cols[idx.cpu()]
        best[rows] = values.float().cpu()

    workers = max(1, min(workers or torch.get_num_threads(), len(tasks)))
    if device is not None and device.type != "cpu":
        for task in tasks:
            run(task)
    elif workers == 1:
        with _intra_op_threads(1):
            for task in tasks:
                run(task)
    else:
        with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, tasks))
    return assign.numpy(), best


# --------------------------------------------------------------------------- Sinkhorn
def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp that clamps terms below e^-80 of the maximum (negligible in float32).

    Why: torch's exp takes a slow path for large negative arguments; with a small epsilon
    most plan entries are far below the row maximum and torch.logsumexp got ~9x slower.
    """
    m = x.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return (x - m).clamp_min_(-80.0).exp_().sum(dim=dim).log_() + m.squeeze(dim)


@dataclass
class SinkhornResult:
    row_potential: torch.Tensor   # f (n_rows,)
    col_potential: torch.Tensor   # g (n_cols,)
    epsilon: float                # the absolute regularisation used (scores / epsilon)
    iterations: int
    col_error: float              # max |log column sum - class target| at the end


def sinkhorn_blocks(blocks: list[Block], scores: list[torch.Tensor], n_rows: int,
                    col_class: torch.Tensor, epsilon: float = 0.05, iters: int = 100,
                    tol: float = 1e-3, workers: int | None = None) -> SinkhornResult:
    """Log-domain Sinkhorn on block scores: rows of mass 1, equal column mass within a class.

    The plan is P_ij = exp(S_ij / eps + f_i + g_j) on the blocks (zero elsewhere). Row
    updates make every row sum to 1. Column updates project (KL-wise) onto "all columns of
    a class receive the same mass", whose target is the geometric mean of that class's
    current column sums: with only labeled rows this is n_rgb_c / n_ms_c per column; the
    unlabeled rows are free to choose the class and are only spread evenly within it.
    `epsilon` is relative to the standard deviation of the scores (scale-free). Blocks are
    processed on `workers` threads with single-threaded torch ops (see _blockwise_argmax);
    default: torch's thread count from SINKHORN_PARALLEL_ENTRIES scores on, else one.
    """
    n_cols = col_class.shape[0]
    flat = torch.cat([s.reshape(-1) for s in scores])
    scale = float(flat.std()) if flat.numel() > 1 else 1.0
    eps = epsilon * (scale if np.isfinite(scale) and scale > 0 else 1.0)
    logits = [s / eps for s in scores]
    f = torch.zeros(n_rows)
    g = torch.zeros(n_cols)
    used = torch.zeros(n_cols, dtype=torch.bool)
    for b in blocks:
        used[b.cols] = True
    n_classes = int(col_class.max()) + 1 if n_cols else 0
    per_class = torch.bincount(col_class[used], minlength=n_classes).clamp_min(1).float()
    pairs = list(zip(blocks, logits, strict=True))

    def update_rows(item: tuple[Block, torch.Tensor]) -> None:
        b, lg = item
        f[b.rows] = -_logsumexp(lg + g[b.cols][None, :], dim=1)  # rows are disjoint

    def column_sums(item: tuple[Block, torch.Tensor]) -> torch.Tensor:
        b, lg = item
        return _logsumexp(lg + f[b.rows][:, None], dim=0) + g[b.cols]

    error, it = float("inf"), 0
    if workers is None:
        # Small problems: the per-iteration thread hand-offs would cost more than they save.
        workers = torch.get_num_threads() if flat.numel() >= SINKHORN_PARALLEL_ENTRIES else 1
    workers = max(1, min(workers, len(pairs)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(_intra_op_threads(1))
        # One worker runs inline: a thread hand-off per block costs a scheduler slice on a busy CPU.
        pmap = stack.enter_context(ThreadPoolExecutor(workers)).map if workers > 1 else map
        for it in range(1, iters + 1):  # noqa: B007 - the count reached is returned below
            list(pmap(update_rows, pairs))
            log_col = torch.full((n_cols,), float("-inf"))
            # The unlabeled block shares columns with the class blocks: combine in order.
            for b, contrib in zip(blocks, pmap(column_sums, pairs), strict=True):
                log_col[b.cols] = torch.logaddexp(log_col[b.cols], contrib)
            target = torch.zeros(n_classes).index_add_(0, col_class[used], log_col[used]) / per_class
            gap = target[col_class[used]] - log_col[used]
            g[used] += gap
            error = float(gap.abs().max()) if gap.numel() else 0.0
            if error < tol:
                break
    return SinkhornResult(f, g, eps, it, error)


def _balanced_from_scores(blocks: list[Block], scores: list[torch.Tensor], n_rows: int,
                          ms_labels: np.ndarray, epsilon: float, iters: int, tol: float,
                          rounding: str, seed: int, workers: int | None) -> np.ndarray:
    if rounding not in ("argmax", "sample"):
        raise ValueError(f"rounding must be 'argmax' or 'sample', got {rounding!r}")
    col_class = torch.from_numpy(ms_labels)
    res = sinkhorn_blocks(blocks, scores, n_rows, col_class, epsilon, iters, tol, workers)
    gen = torch.Generator().manual_seed(seed)
    assign = np.full(n_rows, -1, dtype=np.int64)
    for b, s in zip(blocks, scores, strict=True):
        # f_i is constant along a row, so the plan's row argmax is argmax_j S_ij/eps + g_j.
        logits = s / res.epsilon + res.col_potential[b.cols][None, :]
        if rounding == "argmax":
            idx = logits.argmax(dim=1)
        else:
            idx = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)
        assign[b.rows.numpy()] = b.cols[idx].numpy()
    return assign


# --------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class PairingOptions:
    """The settings of the pairing methods (each reads those it uses)."""

    sinkhorn_iters: int = 100       # balanced
    epsilon: float = 0.05           # balanced: entropic regularisation, relative to the scores' std
    tol: float = 1e-3               # balanced: Sinkhorn's stopping tolerance
    rounding: str = "argmax"        # balanced: a row's partner is its plan's argmax, or a 'sample' of it
    seed: int = 0                   # random draws (random pairing; balanced with rounding='sample')
    chunk: int | None = None        # rows per GEMM (default: about 2 MB of scores)
    workers: int | None = None      # CPU threads (default: torch's)


def assign_pairs(sim: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike,
                 method: str = "balanced", sinkhorn_iters: int = 100, epsilon: float = 0.05,
                 tol: float = 1e-3, rounding: str = "argmax", seed: int = 0,
                 chunk: int | None = None, workers: int | None = None) -> np.ndarray:
    """MS partner index (N_rgb,) for every RGB row of the matcher similarity `sim` (N_rgb, N_ms).

    Labeled RGB rows only take MS columns of their class; unlabeled rows (-1) any column.
    method 'nearest': the most similar allowed column (hubs possible). 'balanced':
    Sinkhorn transport plan with equal MS mass within each class, rounded per row by
    argmax (or by sampling the plan's row with rounding='sample'); `epsilon` is the
    entropic regularisation relative to the std of the allowed similarities (smaller =
    closer to a hard matching, needs more iterations). 'random': a random allowed column.
    """
    options = PairingOptions(sinkhorn_iters, epsilon, tol, rounding, seed, chunk, workers)
    return pairing_method(method).assign(sim, rgb_labels, ms_labels, options)


def _assign_blocks(sim: ArrayLike, rgb_labels: ArrayLike,
                   ms_labels: ArrayLike) -> tuple[torch.Tensor, np.ndarray, list[Block]]:
    """The similarities as float, the MS labels and the allowed blocks of one assignment."""
    sim_t = _as_float(sim)
    rgb, ms = _labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")
    if sim_t.shape != (len(rgb), len(ms)):
        raise ValueError(f"sim must be (N_rgb, N_ms) = ({len(rgb)}, {len(ms)}), got {tuple(sim_t.shape)}")
    return sim_t, ms, class_blocks(rgb, ms)


def _assign_nearest(sim: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike, o: PairingOptions) -> np.ndarray:
    sim_t, _, blocks = _assign_blocks(sim, rgb_labels, ms_labels)

    def score(block: Block) -> Callable[[int, int], torch.Tensor]:
        sub = sim_t[block.rows][:, block.cols]
        return lambda start, stop: sub[start:stop]

    return _blockwise_argmax(blocks, len(sim_t), score, o.chunk, o.workers)[0]


def _assign_balanced(sim: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike, o: PairingOptions) -> np.ndarray:
    sim_t, ms, blocks = _assign_blocks(sim, rgb_labels, ms_labels)
    scores = [sim_t[b.rows][:, b.cols] for b in blocks]
    return _balanced_from_scores(blocks, scores, len(sim_t), ms, o.epsilon, o.sinkhorn_iters, o.tol, o.rounding,
                                 o.seed, o.workers)


def _assign_random(sim: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike, o: PairingOptions) -> np.ndarray:
    sim_t, _, blocks = _assign_blocks(sim, rgb_labels, ms_labels)
    return random_pairs(blocks, len(sim_t), o.seed)


def random_pairs(blocks: list[Block], n_rows: int, seed: int = 0) -> np.ndarray:
    """A uniformly random allowed partner per row (same class where labeled): the control
    that shows what the matcher's choice adds."""
    gen = torch.Generator().manual_seed(seed)
    assign = np.full(n_rows, -1, dtype=np.int64)
    for b in blocks:
        pick = torch.randint(0, len(b.cols), (len(b.rows),), generator=gen)
        assign[b.rows.numpy()] = b.cols[pick].numpy()
    return assign


def repair_randomly(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike,
                    ms_labels: ArrayLike, gen: torch.Generator) -> np.ndarray:
    """Re-pairing for `random` pairing: a new random allowed partner per row, whatever the
    student predicts (the control stays random through training)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return random_pairs(class_blocks(_labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")),
                        len(np.asarray(rgb_labels)), seed)


def _kl_operands(student_logp: ArrayLike, teacher_p: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Left (N_rgb, K+1) and right (N_ms, K+1) with left @ right.T = -KL(t_j || s_i).

    KL(t_j || s_i) = sum_k t_jk log t_jk - sum_k t_jk log s_ik: a per-MS constant (the
    negative entropy h_j) minus a dot product, folded into one extra GEMM column.
    """
    s = _as_float(student_logp)
    t = _as_float(teacher_p)
    if s.dim() != 2 or t.dim() != 2 or s.shape[1] != t.shape[1]:
        raise ValueError(f"student log-probs (N_rgb, K) and teacher probs (N_ms, K) need the same K; "
                         f"got {tuple(s.shape)} and {tuple(t.shape)}")
    neg_entropy = torch.xlogy(t, t).sum(dim=1, keepdim=True)
    left = torch.cat([s.clamp_min(MIN_LOGP), torch.ones(s.shape[0], 1, dtype=s.dtype, device=s.device)], dim=1)
    right = torch.cat([t, -neg_entropy], dim=1)
    return left, right


def kl_cost_matrix(student_logp: ArrayLike, teacher_p: ArrayLike) -> torch.Tensor:
    """Dense KL(t_j || s_i) matrix (N_rgb, N_ms); for small sets and tests."""
    left, right = _kl_operands(student_logp, teacher_p)
    return -(left @ right.T)


def _kl_scorer(left: torch.Tensor, right: torch.Tensor) -> Callable[[Block], Callable[[int, int], torch.Tensor]]:
    def score(block: Block) -> Callable[[int, int], torch.Tensor]:
        # Gather the block's rows and columns once, contiguous, so every chunk is a plain GEMM.
        lb = left[block.rows.to(left.device)]
        rb = right[block.cols.to(right.device)].T.contiguous()
        return lambda start, stop: lb[start:stop] @ rb
    return score


def repair_by_kl(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike,
                 ms_labels: ArrayLike, chunk: int | None = None, return_kl: bool = False,
                 workers: int | None = None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """For every RGB i: argmin over allowed MS j of KL(t_j || s_i).

    student_logp (N_rgb, K): the student's log-probabilities; teacher_p (N_ms, K): the
    teacher's probabilities. Allowed: MS of the same class for labeled rows, any MS for
    unlabeled rows (-1). One GEMM per chunk of `chunk` rows within each class block (default:
    about 2 MB of scores per GEMM); works on whichever device the inputs are on. On CPU the
    chunks are spread over `workers` threads (default: torch.get_num_threads()). With
    return_kl, also returns the minimal KL per row (N_rgb,).
    """
    rgb, ms = _labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")
    left, right = _kl_operands(student_logp, teacher_p)
    if left.shape[0] != len(rgb) or right.shape[0] != len(ms):
        raise ValueError("one label per RGB row of student_logp and per MS row of teacher_p is needed")
    blocks = class_blocks(rgb, ms)
    assign, best = _blockwise_argmax(blocks, len(rgb), _kl_scorer(left, right), chunk, workers, left.device)
    if return_kl:
        return assign, (-best).numpy()
    return assign


def repair_by_kl_balanced(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike,
                          ms_labels: ArrayLike, sinkhorn_iters: int = 100, epsilon: float = 0.05,
                          tol: float = 1e-3, rounding: str = "argmax", seed: int = 0,
                          max_entries: int = 100_000_000, workers: int | None = None) -> np.ndarray:
    """`repair_by_kl` with balanced MS use: Sinkhorn on -KL within the class blocks.

    Holds every allowed score in memory (sum over classes of n_rgb_c * n_ms_c, plus
    n_unlabeled * N_ms) and iterates over it; `max_entries` guards against sizes where
    only `repair_by_kl` is practical.
    """
    rgb, ms = _labels(rgb_labels, "rgb_labels"), _labels(ms_labels, "ms_labels")
    left, right = _kl_operands(student_logp, teacher_p)
    if left.shape[0] != len(rgb) or right.shape[0] != len(ms):
        raise ValueError("one label per RGB row of student_logp and per MS row of teacher_p is needed")
    blocks = class_blocks(rgb, ms)
    total = sum(len(b.rows) * len(b.cols) for b in blocks)
    if total > max_entries:
        raise ValueError(f"balanced re-pairing would hold {total:,} KL values (limit {max_entries:,}); "
                         "use repair_by_kl, or raise max_entries if memory allows")
    left, right = left.cpu(), right.cpu()
    scores = [left[b.rows] @ right[b.cols].T for b in blocks]
    return _balanced_from_scores(blocks, scores, len(rgb), ms, epsilon, sinkhorn_iters, tol, rounding, seed,
                                 workers)


def _repair_nearest(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike,
                    o: PairingOptions, gen: torch.Generator) -> np.ndarray:
    assign = repair_by_kl(student_logp, teacher_p, rgb_labels, ms_labels, chunk=o.chunk, workers=o.workers)
    assert isinstance(assign, np.ndarray)  # without return_kl: the partners alone
    return assign


def _repair_balanced(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike,
                     o: PairingOptions, gen: torch.Generator) -> np.ndarray:
    return repair_by_kl_balanced(student_logp, teacher_p, rgb_labels, ms_labels, o.sinkhorn_iters, o.epsilon,
                                 o.tol, o.rounding, o.seed, workers=o.workers)


def _repair_random(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike,
                   o: PairingOptions, gen: torch.Generator) -> np.ndarray:
    return repair_randomly(student_logp, teacher_p, rgb_labels, ms_labels, gen)


@dataclass(frozen=True)
class Pairing:
    """A pairing method: the first assignment from the matcher's similarities
    (sim, rgb_labels, ms_labels, options), and step 5's re-pairing from the student's
    predictions (student_logp, teacher_p, rgb_labels, ms_labels, options, generator)."""

    assign: Callable[[ArrayLike, ArrayLike, ArrayLike, PairingOptions], np.ndarray]
    repair: Callable[[ArrayLike, ArrayLike, ArrayLike, ArrayLike, PairingOptions, torch.Generator], np.ndarray]


# Implementations of choices.PAIRING_METHODS, by the same names (a test checks they agree).
PAIRING: dict[str, Pairing] = {
    "balanced": Pairing(assign=_assign_balanced, repair=_repair_balanced),
    "nearest": Pairing(assign=_assign_nearest, repair=_repair_nearest),
    "random": Pairing(assign=_assign_random, repair=_repair_random),  # the control stays random
}


def pairing_method(name: str) -> Pairing:
    if name not in PAIRING:
        raise ValueError(f"pairing method must be one of {', '.join(PAIRING_METHODS)}, got {name!r}")
    return PAIRING[name]


def repairer(method: str, options: PairingOptions) -> Callable[[ArrayLike, ArrayLike, ArrayLike, ArrayLike],
                                                                 np.ndarray]:
    """Step 5 of `method` as a function of (student_logp, teacher_p, rgb_labels, ms_labels);
    its random draws (random pairing) go on from call to call, from `options.seed`."""
    repair = pairing_method(method).repair
    gen = torch.Generator().manual_seed(options.seed)

    def run(student_logp: ArrayLike, teacher_p: ArrayLike, rgb_labels: ArrayLike, ms_labels: ArrayLike) -> np.ndarray:
        return repair(student_logp, teacher_p, rgb_labels, ms_labels, options, gen)

    return run


def pairing_stats(assign: ArrayLike, ms_labels: ArrayLike) -> dict[str, float | int]:
    """How concentrated an assignment is on few MS samples (hubs).

    distinct_ms / coverage: MS samples used at least once (and their fraction);
    max_count / max_share: the most-used MS sample's partners (and share of all RGB);
    gini: Gini coefficient of the use counts over all MS (0 = even, -> 1 = one hub);
    gini_within_class: the same within each class, averaged weighted by assignments
    (class sizes differ naturally; this isolates hubs inside a class).
    """
    a, ms = _labels(assign, "assign"), _labels(ms_labels, "ms_labels")
    if len(a) and (a.min() < 0 or a.max() >= len(ms)):
        raise ValueError("assign holds indices outside the MS set")
    counts = np.bincount(a, minlength=len(ms))
    within, weight = 0.0, 0
    for c in np.unique(ms):
        cc = counts[ms == c]
        if cc.sum():
            within += _gini(cc) * cc.sum()
            weight += int(cc.sum())
    return {
        "n_rgb": len(a),
        "n_ms": len(ms),
        "distinct_ms": int((counts > 0).sum()),
        "coverage": float((counts > 0).mean()) if len(ms) else 0.0,
        "max_count": int(counts.max()) if len(ms) else 0,
        "max_share": float(counts.max() / len(a)) if len(a) else 0.0,
        "gini": _gini(counts),
        "gini_within_class": float(within / weight) if weight else 0.0,
    }


def _gini(counts: np.ndarray) -> float:
    x = np.sort(counts.astype(np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float((2.0 * np.arange(1, n + 1) @ x) / (n * total) - (n + 1) / n)
