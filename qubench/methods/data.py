"""Turn the forget/retain corpora into padded token batches for the training loop.

Chunking choice: each *document* is tokenised on its own (the tokenizer adds
BOS as it does at evaluation time) and cut into windows of at most `max_len`
tokens; every continuation window gets the same leading special tokens, so
every window looks like the start of a sequence, as each of MUSE's chunks
does. MUSE instead concatenates the whole file and cuts fixed-length chunks.
We keep document boundaries because the memorisation probes (verbmem) prompt
the model with BOS + the start of a forget document: unlearning on exactly
those contexts is what the benchmark measures, while MUSE-style chunks would
start documents mid-window without BOS. The price is padding on short
documents, which every loss masks out.

Batches are right-padded: with a causal model and default position ids,
real tokens then see exactly what they would see unpadded (left padding
would shift their positions), so a padded sequence scores like the unpadded one.

Data parallelism: every process builds the same micro-batches (same seed, same
order) and trains on its own rows of each (`rank_share`), so what an optimizer
step sees does not depend on the number of processes.

Pairing: like MUSE's ForgetRetainDataset, every forget batch travels with a
retain batch of the same size, cycling through the retain set. Unlike MUSE
(forget chunk i always meets retain chunk i mod R) the retain set is consumed
as a shuffled stream, so a retain set larger than the forget set is fully used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from qubench.errors import DataError

DEFAULT_MAX_LEN_CAP = 256


@dataclass(frozen=True)
class ShareOf:
    """Marks one rank's rows of a micro-batch split across data-parallel ranks: the whole micro-batch's
    counts of each unit a loss term averages over, divided by the number of ranks.

    A term that is a mean over units (sequences, label tokens, real positions) divides this rank's sum
    by the matching count here (`qubench.methods.losses.divisor`). The ranks' average of those values,
    which is how DDP and FSDP reduce gradients, is then exactly the whole micro-batch's mean, however
    unevenly the tokens fall on the ranks; a per-rank mean averaged over ranks would not be.
    """

    sequences: float
    label_tokens: float  # next-token predictions with a real token on both sides
    positions: float     # real (non-padding) positions


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor       # [batch, time], right-padded
    attention_mask: torch.Tensor  # [batch, time], 1 on real tokens, 0 on padding
    share_of: ShareOf | None = None  # set on one rank's rows of a micro-batch split across ranks

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.share_of)


def default_max_len(model_config) -> int:
    """min(the model's context length, 256): long enough for news paragraphs, cheap on CPU."""
    limit = getattr(model_config, "max_position_embeddings", None) or DEFAULT_MAX_LEN_CAP
    return min(int(limit), DEFAULT_MAX_LEN_CAP)


def _leading_specials(ids: list[int], special_ids: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[n] in special_ids:
        n += 1
    return n


def chunk_documents(docs: Sequence[str], tokenizer, max_len: int) -> list[list[int]]:
    """Token windows of at most `max_len` ids, each starting with the tokenizer's own prefix (BOS)."""
    if max_len < 2:
        raise DataError(f"max_len must be at least 2 tokens, got {max_len}")
    special = set(tokenizer.all_special_ids)
    windows: list[list[int]] = []
    for doc in docs:
        # verbose=False: long documents are expected here; we cut them ourselves.
        ids = tokenizer(doc, add_special_tokens=True, verbose=False)["input_ids"]
        n_prefix = _leading_specials(ids, special)
        prefix, body = ids[:n_prefix], ids[n_prefix:]
        width = max_len - len(prefix)
        if width < 1:
            raise DataError(f"max_len={max_len} leaves no room after the {len(prefix)} prefix tokens")
        for start in range(0, len(body), width):
            window = prefix + body[start : start + width]
            if len(window) >= 2:  # a window needs at least one next-token label
                windows.append(window)
    return windows


def collate(windows: Sequence[list[int]], pad_id: int) -> TokenBatch:
    """Right-pad `windows` into one batch."""
    width = max(len(w) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        input_ids[row, : len(window)] = torch.tensor(window, dtype=torch.long)
        attention_mask[row, : len(window)] = 1
    return TokenBatch(input_ids, attention_mask)


def rank_share(batch: TokenBatch, rank: int, ranks: int) -> tuple[TokenBatch, float]:
    """Rank `rank`'s contiguous rows of a micro-batch split across `ranks` processes, and its weight.

    Rows are dealt as evenly as possible (a full micro-batch divides exactly; the training loop checks
    that). A rank left without rows (a short last micro-batch with fewer rows than ranks) gets the
    first row with weight 0: it still runs forward and backward, so the collectives of DDP and FSDP
    stay in step, but contributes nothing. One rank: the batch itself, weight 1.
    """
    if ranks == 1:
        return batch, 1.0
    mask = batch.attention_mask
    whole = ShareOf(
        sequences=len(batch) / ranks,
        label_tokens=float((mask[:, :-1] * mask[:, 1:]).sum()) / ranks,
        positions=float(mask.sum()) / ranks,
    )
    rows = torch.tensor_split(torch.arange(len(batch)), ranks)[rank]
    weight = 1.0
    if len(rows) == 0:
        rows, weight = torch.arange(1), 0.0
    return TokenBatch(batch.input_ids[rows], batch.attention_mask[rows], whole), weight


def batches_per_epoch(n_windows: int, batch_size: int) -> int:
    return math.ceil(n_windows / batch_size)


class _ShuffledCycle:
    """Endless stream of indices into `n` items: a fresh permutation each pass."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator = n, generator
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out


def forget_retain_batches(
    forget: Sequence[list[int]],
    retain: Sequence[list[int]] | None,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    pad_id: int,
) -> Iterator[tuple[int, TokenBatch, TokenBatch | None]]:
    """Yield (epoch, forget batch, paired retain batch or None); the last batch of an epoch may be short."""
    if not forget:
        raise DataError("the forget set is empty: nothing to unlearn")
    if retain is not None and not retain:
        raise DataError("this method needs retain data but the retain set is empty")
    retain_stream = _ShuffledCycle(len(retain), generator) if retain else None
    for epoch in range(epochs):
        order = torch.randperm(len(forget), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            forget_batch = collate([forget[i] for i in picked], pad_id)
            retain_batch = None
            if retain_stream is not None:
                retain_batch = collate([retain[i] for i in retain_stream.take(len(picked))], pad_id)
            yield epoch, forget_batch, retain_batch
