"""Similarity statistics of the residual stream, accumulated in one streaming pass.

A model with N residual blocks exposes residual-stream *points*: the input of each
block and the output of the last one. For every pair of points (i, j) we keep

* the mean over tokens of cos(h_i, h_j)                       -> `similarity`
* the mean over tokens of arccos(cos(h_i, h_j)) / pi           -> `angular`
* the mean over sequences of that angle on each last token     -> `last_token_angular`

Only sums and counts are stored (O(P^2) memory), so batches can be added in any
order, split in any way, or summed across processes, and the result is the same.

A *token* is one feature vector of the residual stream (`token_vectors`): a
position of a sequence model's (batch, seq, d) state, an example of an MLP's
(batch, d) state, a pixel of a conv net's (batch, C, H, W) state (its C channels).
Each example is a *sequence* of tokens, and its last token is its last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorp_fx.core.errors import CalibrationError
from lorp_fx.core.model import float64_device


@dataclass(frozen=True, eq=False)
class LayerStatistics:
    """What selectors see of a model: its blocks and the similarity of its residual points.

    `block_points[b] = (i, j)` says block b reads point i and writes point j. In a
    single-stream model that is (b, b + 1); an encoder-decoder has two streams, so
    the decoder's first block does not start where the encoder's last one ends.
    Frozen, with read-only arrays: selectors are pure functions of it.
    """

    points: tuple[str, ...]
    blocks: tuple[str, ...]
    block_points: tuple[tuple[int, int], ...]
    similarity: np.ndarray
    angular: np.ndarray
    last_token_angular: np.ndarray
    token_count: int
    sequence_count: int
    block_kinds: tuple[str, ...] = ()
    removable: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        fix = object.__setattr__  # frozen: normalise the fields once, here
        fix(self, "points", tuple(self.points))
        fix(self, "blocks", tuple(self.blocks))
        fix(self, "block_points", tuple(tuple(map(int, p)) for p in self.block_points))
        fix(self, "block_kinds", tuple(self.block_kinds) or ("layer",) * len(self.blocks))
        fix(self, "removable", tuple(bool(r) for r in self.removable) or (True,) * len(self.blocks))
        for name in ("similarity", "angular", "last_token_angular"):
            array = np.array(getattr(self, name), dtype=np.float64)
            array.setflags(write=False)
            fix(self, name, array)
        fix(self, "token_count", int(self.token_count))
        fix(self, "sequence_count", int(self.sequence_count))

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def block_influence(self) -> np.ndarray:
        """ShortGPT's BI per block: 1 - mean token cosine between its input and output."""
        return np.array([1.0 - self.similarity[i, j] for i, j in self.block_points])

    def input_similarity(self) -> np.ndarray:
        """S restricted to the blocks' inputs (the N x N matrix the LoRP paper uses)."""
        entries = [i for i, _ in self.block_points]
        return self.similarity[np.ix_(entries, entries)]

    def is_contiguous(self, first: int, last: int) -> bool:
        """True when blocks first..last (inclusive) follow each other on one stream."""
        return all(self.block_points[b][1] == self.block_points[b + 1][0] for b in range(first, last))

    def streams(self) -> list[list[int]]:
        """Block indices of each residual stream (an encoder-decoder has two), in depth order."""
        out: list[list[int]] = []
        for b in range(self.n_blocks):
            if out and self.is_contiguous(b - 1, b):
                out[-1].append(b)
            else:
                out.append([b])
        return out

    def to_dict(self) -> dict:
        return {
            "points": list(self.points),
            "blocks": list(self.blocks),
            "block_points": [list(p) for p in self.block_points],
            "block_kinds": list(self.block_kinds),
            "removable": list(self.removable),
            "similarity": self.similarity.tolist(),
            "angular": self.angular.tolist(),
            "last_token_angular": self.last_token_angular.tolist(),
            "token_count": int(self.token_count),
            "sequence_count": int(self.sequence_count),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LayerStatistics":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @classmethod
    def from_similarity(cls, similarity, blocks: list[str] | None = None) -> "LayerStatistics":
        """Statistics of a single-stream model known only by its (N+1) x (N+1) similarity matrix.

        The angular matrices are estimated from S (arccos of the mean cosine), which
        is exact only when every token has the same cosine; tests and the reference
        figures use this, a real calibration pass measures them.
        """
        s = np.asarray(similarity, dtype=np.float64)
        n = s.shape[0] - 1
        blocks = blocks or [f"layers.{i}" for i in range(n)]
        angle = np.arccos(np.clip(s, -1.0, 1.0)) / np.pi
        return cls(
            points=[f"{b}:in" for b in blocks] + [f"{blocks[-1]}:out"],
            blocks=blocks,
            block_points=[(i, i + 1) for i in range(n)],
            similarity=s,
            angular=angle,
            last_token_angular=angle,
            token_count=0,
            sequence_count=0,
        )


def token_vectors(state: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """A residual state as (batch, positions, features): the vectors whose cosines the statistics average.

    The first dim is the batch and the feature dim is the last one: (batch, d) has one
    token per example, (batch, seq, d) one per position, (batch, H, W, C) one per pixel.
    `channels_first` streams (convolutions: PyTorch's (batch, C, *spatial) layout) have
    their features in dim 1, and a token is the C-vector at one spatial position.
    """
    if state.dim() == 0:
        raise CalibrationError("a residual state is a scalar; the statistics need vectors (batch, ..., features)")
    if state.dim() == 1:  # one unbatched vector
        return state.reshape(1, 1, -1)
    if channels_first and state.dim() > 2:
        state = state.movedim(1, -1)
    return state.reshape(state.shape[0], -1, state.shape[-1])


class SimilarityAccumulator:
    """Streaming sums behind `LayerStatistics`.

    `update` takes one batch of residual states, P tensors of one shape (see
    `token_vectors`) or a stacked (P, batch, seq, d) tensor, and an optional
    attention mask (batch, positions); masked tokens are ignored and the last token
    of each sequence is its last unmasked one. Sums are kept in float64 on the
    states' device (the CPU for MPS, which has no float64), whatever the model's dtype, so bf16 models match a float64
    reference to well under 1e-3.
    """

    # Tokens normalised in float64 at a time: bounds the extra memory of one batch.
    CHUNK_TOKENS = 512
    SUM_NAMES = ("cos_sum", "angle_sum", "last_angle_sum", "token_count", "sequence_count")

    def __init__(self, n_points: int):
        self.n_points = n_points
        self.cos_sum = torch.zeros(n_points, n_points, dtype=torch.float64)
        self.angle_sum = torch.zeros(n_points, n_points, dtype=torch.float64)
        self.last_angle_sum = torch.zeros(n_points, n_points, dtype=torch.float64)
        self.token_count = torch.zeros((), dtype=torch.float64)
        self.sequence_count = torch.zeros((), dtype=torch.float64)

    def _to(self, device: torch.device) -> None:
        for name in self.SUM_NAMES:
            setattr(self, name, getattr(self, name).to(device))

    @torch.no_grad()
    def update(
        self,
        states: torch.Tensor | Sequence[torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        *,
        channels_first: bool = False,
    ) -> None:
        """Add one batch: `states` is (P, batch, seq, d), or a list of P states of any one shape
        (`token_vectors` says what a token is; `channels_first` for convolutional streams)."""
        if isinstance(states, torch.Tensor):
            if states.dim() == 3:  # (P, tokens, d): one unbatched sequence
                states = states.unsqueeze(1)
            states = list(states)
        if len(states) != self.n_points:
            raise CalibrationError(f"expected states of {self.n_points} residual points, got {len(states)}")
        device = float64_device(states[0].device)
        states = [token_vectors(state, channels_first).to(device) for state in states]
        batch, seq = states[0].shape[:2]
        self._to(device)
        if attention_mask is None:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        elif attention_mask.numel() != batch * seq:
            raise CalibrationError(
                f"the attention mask has shape {tuple(attention_mask.shape)}, but the residual states have "
                f"{batch} x {seq} tokens; pass a (batch, positions) mask of the states' tokens, or none"
            )
        else:
            mask = attention_mask.to(device).bool().reshape(batch, seq)
        lengths = mask.sum(dim=1)
        valid = lengths > 0
        if not bool(valid.any()):
            raise CalibrationError(
                "a calibration batch has no valid tokens (its attention_mask is all zeros); "
                "drop empty sequences from the calibration data"
            )
        flat = mask.flatten().nonzero().squeeze(1)  # one index for all points: cheaper than P boolean gathers
        tokens = torch.stack([state.reshape(batch * seq, -1).index_select(0, flat) for state in states], dim=1)
        for chunk in tokens.split(self.CHUNK_TOKENS):
            # Unit vectors and their dot products in float32 (error ~1e-7, far below what
            # selection needs), sums and arccos in float64 so that error does not grow.
            unit = torch.nn.functional.normalize(chunk.float(), dim=-1)
            cos = torch.bmm(unit, unit.transpose(1, 2)).double().clamp_(-1.0, 1.0)  # (chunk, P, P)
            cos.diagonal(dim1=1, dim2=2).fill_(1.0)  # exact: arccos magnifies rounding near 1
            self.cos_sum += cos.sum(0)
            self.angle_sum += torch.arccos(cos).sum(0) / torch.pi
        self.token_count += tokens.shape[0]

        # Last valid token of each sequence: the highest masked-in position.
        positions = torch.arange(seq, device=device).expand(batch, seq)
        last = torch.where(mask, positions, -1).amax(dim=1)[valid]
        rows = torch.nonzero(valid).squeeze(1)
        last_states = torch.stack([state[rows, last] for state in states], dim=1)  # (B', P, d)
        last_states = torch.nn.functional.normalize(last_states.double(), dim=-1)
        last_cos = torch.bmm(last_states, last_states.transpose(1, 2)).clamp_(-1.0, 1.0)
        self.last_angle_sum += torch.arccos(last_cos).sum(0) / torch.pi
        self.sequence_count += last_states.shape[0]

    def merge(self, other: "SimilarityAccumulator") -> None:
        for name in self.SUM_NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name).to(getattr(self, name).device))

    def reduce(self, reduce) -> None:
        """Sum the accumulated sums over the processes in one all-reduce (`reduce` sums a float64 tensor)."""
        sums = [getattr(self, name) for name in self.SUM_NAMES]
        flat = reduce(torch.cat([s.reshape(-1).to(torch.float64) for s in sums]))
        offset = 0
        for name, value in zip(self.SUM_NAMES, sums):
            setattr(self, name, flat[offset : offset + value.numel()].view_as(value).to(value.dtype).clone())
            offset += value.numel()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().cpu().clone() for name in self.SUM_NAMES}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.SUM_NAMES:
            setattr(self, name, state[name].clone().to(torch.float64))

    def statistics(
        self,
        points: list[str],
        blocks: list[str],
        block_points: list[tuple[int, int]],
        block_kinds: list[str] | None = None,
        removable: list[bool] | None = None,
    ) -> LayerStatistics:
        tokens = float(self.token_count)
        sequences = float(self.sequence_count)
        if tokens == 0:
            raise CalibrationError("no calibration tokens were seen: the calibration loader is empty")
        return LayerStatistics(
            points=points,
            blocks=blocks,
            block_points=block_points,
            similarity=(self.cos_sum / tokens).cpu().numpy(),
            angular=(self.angle_sum / tokens).cpu().numpy(),
            last_token_angular=(self.last_angle_sum / max(sequences, 1.0)).cpu().numpy(),
            token_count=int(tokens),
            sequence_count=int(sequences),
            block_kinds=block_kinds or [],
            removable=removable or [],
        )


def combine_streams(streams: Sequence[tuple[Sequence[int], SimilarityAccumulator]], points: list[str], blocks: list,
                    block_points: list[tuple[int, int]]) -> LayerStatistics:
    """One LayerStatistics over every residual point from per-stream accumulators.

    `streams` pairs each stream's point indices with its accumulator; `blocks` are
    ResidualBlocks. Pairs of points in different streams (T5's encoder and decoder)
    get cosine 0 and angular distance 0.5: they were never compared.
    """
    total = len(points)
    similarity = torch.zeros(total, total, dtype=torch.float64)
    angular = torch.full((total, total), 0.5, dtype=torch.float64)
    last = torch.full((total, total), 0.5, dtype=torch.float64)
    tokens = sequences = 0
    for indices, accumulator in streams:
        stats = accumulator.statistics(["?"] * len(indices), [], [])
        grid = torch.tensor(list(indices))
        rows, cols = grid[:, None], grid[None, :]
        similarity[rows, cols] = torch.tensor(stats.similarity)  # copies: the statistics' arrays are read-only
        angular[rows, cols] = torch.tensor(stats.angular)
        last[rows, cols] = torch.tensor(stats.last_token_angular)
        tokens, sequences = max(tokens, stats.token_count), max(sequences, stats.sequence_count)
    return LayerStatistics(
        points=list(points),
        blocks=[b.name for b in blocks],
        block_points=list(block_points),
        similarity=similarity.numpy(),
        angular=angular.numpy(),
        last_token_angular=last.numpy(),
        token_count=tokens,
        sequence_count=sequences,
        block_kinds=[b.kind for b in blocks],
        removable=[b.removable for b in blocks],
    )


def check_finite_states(states: list[torch.Tensor], names: list[str]) -> None:
    """CalibrationError naming the first residual point (`block:in` / `block:out`) with a NaN or Inf."""
    for state, name in zip(states, names):
        if not bool(torch.isfinite(state).all()):
            where = f"the output of {name[:-4]}" if name.endswith(":out") else f"the input of {name[:-3]}"
            raise CalibrationError(
                f"NaN or Inf in the residual stream, first at {where}; check the model's dtype "
                "(float16 overflows are common: try float32 or bfloat16) and the calibration inputs"
            )
