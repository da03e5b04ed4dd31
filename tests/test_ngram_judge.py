"""The byte n-gram judge (diffusion_blocks.eval.ngram): interpolated Kneser-Ney
probabilities checked by hand on tiny corpora, distributions that sum to 1, back-off
for unseen contexts, and held-out CE that tells seen text from unseen."""

import math

import pytest
import torch

from diffusion_blocks.eval.ngram import judge_ce, ney_discount, NgramLM, split_text

D = 0.5  # the fixed discount of the hand-computed tests
A, B, X = ord("a"), ord("b"), ord("x")

ENGLISH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness, it was "
    "the spring of hope, it was the winter of despair, we had everything before us, "
    "we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way.\n"
)


def test_unigram_by_hand():
    """'aab': c(a) = 2, c(b) = 1, 3 bytes, 2 seen types; the discounted mass
    D * 2 / 3 spread uniformly over the 256 bytes."""
    model = NgramLM.fit(b"aab", order=1, discount=D)
    assert model.prob(b"", A) == pytest.approx((2 - D + D * 2 / 256) / 3)
    assert model.prob(b"", B) == pytest.approx((1 - D + D * 2 / 256) / 3)
    assert model.prob(b"", X) == pytest.approx((D * 2 / 256) / 3)
    assert model.prob(b"whatever", A) == model.prob(b"", A)  # order 1 reads no context


def test_bigram_by_hand():
    """'aabab': bigrams aa, ab, ba, ab. Histories: a -> 3 bigrams (2 distinct), b -> 1.
    The unigram level counts continuations: N1+(. a) = 2 (aa, ba), N1+(. b) = 1 (ab),
    over 3 distinct bigrams, 2 types seen."""
    model = NgramLM.fit(b"aabab", order=2, discount=D)
    p1 = {A: (2 - D + D * 2 / 256) / 3, B: (1 - D + D * 2 / 256) / 3, X: (D * 2 / 256) / 3}
    assert model.prob(b"a", B) == pytest.approx((2 - D) / 3 + D * 2 / 3 * p1[B])
    assert model.prob(b"a", A) == pytest.approx((1 - D) / 3 + D * 2 / 3 * p1[A])
    assert model.prob(b"a", X) == pytest.approx(D * 2 / 3 * p1[X])
    assert model.prob(b"b", A) == pytest.approx((1 - D) / 1 + D * 1 / 1 * p1[A])
    assert model.prob(b"b", B) == pytest.approx(D * p1[B])
    # an unseen history takes the (continuation) unigram level whole
    for byte in (A, B, X):
        assert model.prob(b"x", byte) == pytest.approx(p1[byte])
    # no history at all (a text's first byte): the raw unigram, c(a) = 3, c(b) = 2 of 5
    assert model.prob(b"", A) == pytest.approx((3 - D + D * 2 / 256) / 5)
    # a longer context is cut to the last byte
    assert model.prob(b"bba", B) == model.prob(b"a", B)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_every_conditional_distribution_sums_to_one(order):
    model = NgramLM.fit(ENGLISH, order=order)
    for context in ["", "i", "it was t", "the ", "zzqq", "direct the other way.\n", "wa"]:
        probs = model.distribution(context)
        assert len(probs) == 256 and min(probs) > 0
        assert math.fsum(probs) == pytest.approx(1.0, abs=1e-12)


def test_unseen_contexts_back_off_to_the_shorter_context():
    model = NgramLM.fit(ENGLISH, order=4)
    # 'Qzt' never occurs, 'zt' never, 't' does: the model answers as for context 't'...
    # at the continuation level, i.e. as the lower orders of a seen longer context do
    assert model.distribution("Qzt") == model.distribution("zzt")
    assert model.distribution("Qzt")[ord("h")] > 0.1  # 'th' is common: not uniform
    seen = model.distribution("it ")
    assert seen[ord("w")] > 0.5  # 'it w' follows 'it ' every time in the text
    unseen = model.distribution("Q% ")
    assert unseen != seen and unseen[ord("w")] < seen[ord("w")]


def test_repeated_text_scores_far_below_unrelated_text():
    model = NgramLM.fit(ENGLISH * 3, order=5)
    repeated = model.heldout_ce(ENGLISH[40:200])
    unrelated = model.heldout_ce("0197 QXJZ kvpq 88342 ^^~~ VXXZ jjqq 4120 ZZQ " * 3)
    assert repeated < 0.5 and unrelated > 3.0


def test_score_is_the_continuations_ce_given_their_prompts():
    model = NgramLM.fit(ENGLISH, order=3)
    text = list("it was the age".encode())
    prompts_BP = torch.tensor([text[:6], text[2:8]])
    continuations_BC = torch.tensor([text[6:10], text[8:12]])
    by_hand = [
        -math.log(model.prob(bytes(p + c[:j]), c[j]))
        for p, c in zip(prompts_BP.tolist(), continuations_BC.tolist()) for j in range(4)
    ]
    assert model.score(prompts_BP, continuations_BC) == pytest.approx(sum(by_hand) / 8)
    assert judge_ce(model, prompts_BP, continuations_BC) == model.score(prompts_BP, continuations_BC)
    # the prompt matters: a context from the text predicts better than none
    assert model.score([b"it was the ag"], [b"e"]) < model.score([b""], [b"e"])


def test_ney_discount():
    assert ney_discount([1, 1, 2, 5]) == pytest.approx(2 / (2 + 2))
    assert ney_discount([7, 9]) == 0.5


def test_split_text_cuts_at_a_line():
    train, heldout = split_text("aaaa\nbbbb\ncccc\n", 0.3)
    assert (train, heldout) == ("aaaa\nbbbb\n", "cccc\n")


@pytest.mark.parametrize("call, message", [
    (lambda: NgramLM.fit("abc", order=0), "order must be >= 1"),
    (lambda: NgramLM.fit("ab", order=3), "fewer than the order"),
    (lambda: NgramLM.fit("abc", discount=1.0), "discount"),
    (lambda: NgramLM.fit("abcabc", order=2).score([[1, 2]], [[3, 257]]), "0..255"),
    (lambda: NgramLM.fit("abcabc", order=2).score([[1], [2]], [[3]]), "2 prompts but 1"),
    (lambda: NgramLM.fit("abcabc", order=2).score([[1]], [[]]), "empty"),
    (lambda: NgramLM.fit("abcabc", order=2).heldout_ce(""), "empty"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
