"""The memory bank of normal patch features: greedy coreset selection and nearest-neighbour
distances (PatchCore, Roth et al., 2022).

The search is exact (chunked torch matrix products) for small banks and an inverted-file index
of faiss for large ones (:class:`BankIndex`): the exact search of a 16k bank cost about 90
GFLOP per megapixel, four times the backbone, and the index visits 1/32 of the bank.
"""

from __future__ import annotations

import numpy as np
import torch

#: queries per block of the nearest-neighbour search (a block of distances to a 20k bank is
#: 8192 x 20k floats = 640 MB at most; 4096 keeps it under half that)
QUERY_BLOCK = 4096


def nearest_distance(queries: torch.Tensor, bank: torch.Tensor,
                     bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance from each query ``(Q, D)`` to its nearest bank vector ``(M, D)``.

    ``bank_sq``: the bank's squared norms, when already computed.
    """
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    out = torch.empty(queries.shape[0], dtype=torch.float32)
    for q0 in range(0, queries.shape[0], QUERY_BLOCK):
        q = queries[q0 : q0 + QUERY_BLOCK].float()
        # |q - b|^2 = |q|^2 - 2 q.b + |b|^2; the minimum over b needs only the last two terms
        d2 = torch.addmm(bank_sq[None, :], q, bank.T, alpha=-2.0).min(1).values
        d2 += (q * q).sum(1)
        out[q0 : q0 + QUERY_BLOCK] = d2.clamp_min_(0.0).sqrt_()
    return out


def greedy_coreset(
    features: torch.Tensor,
    size: int,
    *,
    start: torch.Tensor | None = None,
    projection_dim: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features`` ``(N, D)``.

    Each step takes the feature farthest from everything chosen so far, so rare normal
    appearances (a die corner, a busbar's end) stay in the bank where a random subset would
    drop them. Distances are measured after a fixed random projection to ``projection_dim``
    (Johnson-Lindenstrauss: distances kept to a few per cent at a fraction of the cost), as
    PatchCore does. The projection's 32 dimensions keep the candidates (80k x 32 floats) in
    the processor's cache, which sets the speed of the search.

    Parameters
    ----------
    features : Tensor (N, D)
        Candidate features.
    size : int
        Features to choose (all of them when ``size >= N``).
    start : Tensor (K, D), optional
        Features already in the bank (extending a model): the coreset only adds what they do
        not already cover.
    projection_dim : int
        Dimension of the random projection (no projection when ``D`` is not larger).
    seed : int
        Seed of the projection and of the first choice.
    """
    n, d = features.shape
    if size >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    if d > projection_dim:
        proj = torch.randn(d, projection_dim, generator=gen) / np.sqrt(projection_dim)
        x = features.float() @ proj
        s = start.float() @ proj if start is not None and len(start) else None
    else:
        x = features.float()
        s = start.float() if start is not None and len(start) else None
    if s is not None:
        min_d = torch.full((n,), float("inf"))
        for k0 in range(0, len(s), 256):
            block = torch.cdist(x, s[k0 : k0 + 256])
            min_d = torch.minimum(min_d, block.min(1).values.square())  # squared, as below
        first = int(torch.argmax(min_d))
    else:
        first = int(torch.randint(n, (1,), generator=gen))
        min_d = torch.full((n,), float("inf"))
    chosen = torch.empty(size, dtype=torch.long)
    x = x.contiguous()
    x_sq = (x * x).sum(1)
    d2 = torch.empty(n)
    idx = first
    previous = torch.get_num_threads()
    # one thread: each step is a few passes over N values, too short to share between
    # threads (two threads were 5x slower on a busy 2-core machine, and no faster idle)
    torch.set_num_threads(1)
    try:
        for k in range(size):
            chosen[k] = idx
            # squared distance to the new centre, by one matrix-vector product, in place
            torch.mv(x, x[idx], out=d2)
            d2.mul_(-2.0).add_(x_sq).add_(x_sq[idx])
            torch.minimum(min_d, d2, out=min_d)
            min_d[idx] = -1.0
            idx = int(torch.argmax(min_d))
    finally:
        torch.set_num_threads(previous)
    return chosen


#: banks at least this large are searched through an inverted-file index
INDEX_MIN_BANK = 4096
#: bank features per inverted list, and lists visited per query
LIST_SIZE = 128
PROBES = 4


class BankIndex:
    """Nearest-neighbour distances to a bank: exact for small banks, faiss IVF for large.

    The inverted file (``faiss.IndexIVFFlat``: k-means cells of about :data:`LIST_SIZE`
    features, :data:`PROBES` nearest cells searched) is built from the bank itself, with
    faiss's fixed k-means seed, so the same bank gives the same index and the same scores.
    Build and calibration search the same way, so a neighbour the index misses (a slightly
    larger distance) is in the threshold too.
    """

    def __init__(self, bank: torch.Tensor) -> None:
        self.bank = bank.float().contiguous()
        self.bank_sq = (self.bank * self.bank).sum(1)
        self.index = None
        if len(self.bank) >= INDEX_MIN_BANK:
            import faiss

            d = self.bank.shape[1]
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, max(1, len(self.bank) // LIST_SIZE))
            data = np.ascontiguousarray(self.bank.numpy(), dtype=np.float32)
            index.train(data)
            index.add(data)
            index.nprobe = PROBES
            self.index = index

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Distance from each query ``(Q, D)`` to its nearest bank feature."""
        if self.index is None:
            return nearest_distance(queries, self.bank, self.bank_sq)
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        d2, _ = self.index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), 1)
        return torch.from_numpy(d2[:, 0]).clamp_min_(0.0).sqrt_()
