"""A smoothed byte n-gram language model: a judge that shares no neural model's errors.

`NgramLM.fit(training_text, order=5)` counts the text's byte n-grams; the model is
interpolated Kneser-Ney (Chen and Goodman 1998, section 3.5, one discount per order):

    P(w | h) = max(c(h w) - D, 0) / c(h .) + D N1+(h .) / c(h .) * P(w | h')

with h' = h less its first byte. The highest order in use (n, or fewer bytes at the
start of a text) counts raw occurrences c; every lower order counts continuations,
c(g) = N1+(. g), the distinct bytes seen before g. A history never seen takes the lower
order whole. The unigram level interpolates with the uniform distribution over all 256
bytes, so no byte has probability 0. D = n1 / (n1 + 2 n2) per order and count kind
(n1, n2: the n-grams counted once and twice; Ney et al. 1994) unless given.

`score(prompts, continuations)` is the mean CE (nats/byte) of the continuations given
their prompts, the shape of `models.llama3.evaluation.judge_ce`; `heldout_ce(text)` the
model's own CE on a text. Pure Python: bytes slices as dictionary keys.

    python -m diffusion_blocks.eval.ngram /work/shared/data/tinyshakespeare.txt

prints the 5-gram's CE on the text's last 10% (cut at a line, as tools/lm_report.py
splits it) after fitting the first 90%.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

VOCAB = 256
DEFAULT_ORDER = 5


@dataclass
class Level:
    """One order's counts of one kind: the n-grams' counts, and per history (the
    n-gram less its last byte) the counts' total and how many distinct bytes follow."""

    counts: dict[bytes, int]
    totals: dict[bytes, int]
    followers: dict[bytes, int]
    discount: float

    @classmethod
    def of(cls, counts: dict[bytes, int], discount: float | None) -> "Level":
        totals, followers = Counter(), Counter()
        for gram, count in counts.items():
            totals[gram[:-1]] += count
            followers[gram[:-1]] += 1
        if discount is None:
            discount = ney_discount(counts.values())
        return cls(dict(counts), dict(totals), dict(followers), discount)


def ney_discount(counts: Iterable[int]) -> float:
    """D = n1 / (n1 + 2 n2), kept inside (0, 1); 0.5 when no n-gram occurs once or twice."""
    histogram = Counter(counts)
    n1, n2 = histogram[1], histogram[2]
    if n1 + n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.01), 0.99)


def as_bytes(data: bytes | str | Sequence[int], what: str) -> bytes:
    """A text as bytes: str (UTF-8), bytes, or a sequence of byte ids 0..255 (a list,
    a 1-D tensor)."""
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    ids = data.tolist() if hasattr(data, "tolist") else list(data)
    bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < VOCAB)]
    if bad:
        raise ValueError(f"{what}: a byte n-gram model scores byte ids 0..255, got {bad[:5]}")
    return bytes(ids)


def raw_counts(data: bytes, order: int) -> Counter:
    """Occurrences of every `order`-byte n-gram of data."""
    return Counter(data[i:i + order] for i in range(len(data) - order + 1))


def continuation_counts(longer: dict[bytes, int]) -> Counter:
    """N1+(. g) of every n-gram g: the distinct bytes before it, from the (n+1)-grams."""
    return Counter(gram[1:] for gram in longer)


class NgramLM:
    """An interpolated Kneser-Ney byte n-gram model (see the module docstring)."""

    def __init__(self, order: int, raw: list[Level], continuation: list[Level]):
        self.order = order
        self.raw = raw                  # raw[k - 1]: the k-grams' occurrences, k = 1..n
        self.continuation = continuation  # continuation[k - 1]: N1+(. g), k = 1..n-1

    @classmethod
    def fit(cls, data: bytes | str, order: int = DEFAULT_ORDER,
            discount: float | None = None) -> "NgramLM":
        """Count `data` (str: its UTF-8 bytes); `discount` fixes D at every level."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if discount is not None and not 0 < discount < 1:
            raise ValueError(f"discount must lie in (0, 1), got {discount}")
        data = as_bytes(data, "training text")
        if len(data) < order:
            raise ValueError(f"the training text has {len(data)} bytes, fewer than the order {order}")
        counts = [raw_counts(data, k) for k in range(1, order + 1)]
        raw = [Level.of(c, discount) for c in counts]
        continuation = [Level.of(continuation_counts(counts[k]), discount) for k in range(1, order)]
        return cls(order, raw, continuation)

    def history(self, context: bytes) -> bytes:
        return context[len(context) - (self.order - 1):] if self.order > 1 else b""

    def prob(self, context: bytes, byte: int) -> float:
        """P(byte | the context's last order - 1 bytes)."""
        history = self.history(context)
        return self._prob(history, byte.to_bytes(1, "big"), self.raw[len(history)])

    def _prob(self, history: bytes, byte: bytes, level: Level) -> float:
        lower = (1.0 / VOCAB if not history
                 else self._prob(history[1:], byte, self.continuation[len(history) - 1]))
        total = level.totals.get(history, 0)
        if total == 0:
            return lower
        discount = level.discount
        seen = max(level.counts.get(history + byte, 0) - discount, 0.0)
        return (seen + discount * level.followers[history] * lower) / total

    def distribution(self, context: bytes | str = b"") -> list[float]:
        """P(. | context) over the 256 bytes."""
        context = as_bytes(context, "context")
        return [self.prob(context, byte) for byte in range(VOCAB)]

    def nats(self, text: bytes, context: bytes = b"") -> float:
        """Total -log P of text's bytes, each given context + the text before it."""
        full, start = context + text, len(context)
        return -sum(
            math.log(self.prob(full[max(0, i - self.order + 1):i], full[i]))
            for i in range(start, len(full))
        )

    def heldout_ce(self, text: bytes | str) -> float:
        """Mean CE (nats/byte) of a text scored from its first byte (the first
        order - 1 bytes with the shorter histories they have)."""
        text = as_bytes(text, "text")
        if not text:
            raise ValueError("the held-out text is empty")
        return self.nats(text) / len(text)

    def score(self, prompts_BP, continuations_BC) -> float:
        """Mean CE (nats/byte) of the continuations given their prompts (rows of byte
        ids: tensors (B, P) and (B, C), lists of lists, or bytes), over all their bytes:
        `evaluation.judge_ce`'s shape with this model as the judge."""
        prompts = [as_bytes(row, "prompt") for row in prompts_BP]
        continuations = [as_bytes(row, "continuation") for row in continuations_BC]
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        count = sum(len(c) for c in continuations)
        if count == 0:
            raise ValueError("nothing to score: the continuations are empty")
        return sum(self.nats(c, p) for p, c in zip(prompts, continuations)) / count


def judge_ce(model: NgramLM, prompts_BP, continuations_BC) -> float:
    """`evaluation.judge_ce` with an n-gram model as the judge (nats/byte)."""
    return model.score(prompts_BP, continuations_BC)


def split_text(text: str, heldout_fraction: float = 0.1) -> tuple[str, str]:
    """(training, held-out): the held-out part the last `heldout_fraction`, starting at
    a line (tools/lm_report.py's split)."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    cut = text.rfind("\n", 0, int(len(text) * (1 - heldout_fraction))) + 1
    return text[:cut], text[cut:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="A byte n-gram model's held-out CE on a text file.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--order", type=int, default=DEFAULT_ORDER)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    train, heldout = split_text(args.path.read_text(encoding="utf-8"), args.heldout_fraction)
    model = NgramLM.fit(train, args.order)
    ce = model.heldout_ce(heldout)
    print(f"{args.order}-gram (interpolated Kneser-Ney) fit on {len(train.encode())} bytes: "
          f"held-out CE {ce:.4f} nats/byte ({ce / math.log(2):.4f} bits/byte) "
          f"on {len(heldout.encode())} bytes")


if __name__ == "__main__":
    main()


def byte_rows(rows_BT) -> list[bytes]:
    """Each row of token ids as bytes, the ids >= 256 (the byte tokenizer's BOS/EOS,
    which a byte n-gram model has no counts of) dropped."""
    rows = rows_BT.tolist() if hasattr(rows_BT, "tolist") else [list(r) for r in rows_BT]
    return [bytes(i for i in row if 0 <= i < VOCAB) for row in rows]


def judge_ce_on_bytes(model: NgramLM, prompts_BP, continuations_BC) -> float:
    """`judge_ce` on rows of a byte tokenizer's ids, its special ids (>= 256) dropped
    from prompts and continuations alike; NaN when no continuation byte is left."""
    continuations = byte_rows(continuations_BC)
    if not any(continuations):
        return math.nan
    return model.score(byte_rows(prompts_BP), continuations)
