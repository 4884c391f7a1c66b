"""Greedy and beam search (mmmoe.generation): against hand-made Markov "models" with known answers,
an exhaustive search, and cached vs uncached decoding of the real tiny backbone."""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmmoe.generation import beam_search, generate, greedy_search, length_normalise, strip_special
from mmmoe.models import TokenHead, create_model

PAD, UNK, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU run many times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _ToyCache:
    """Stands in for KVCache: the Markov toy needs no state beyond the token it is fed."""

    def index_select(self, index):
        return self


class MarkovToy:
    """A 'backbone' whose next-token distribution depends only on the last token: the hidden state
    is the one-hot of each position's id, and ``logits_fn`` looks up a row of log-probabilities."""

    def __init__(self, probs):
        V = len(next(iter(probs.values())))
        table = torch.full((V, V), 1.0 / V, dtype=torch.float64)
        for prev, row in probs.items():
            table[prev] = torch.tensor(row, dtype=torch.float64)
        self.logp = table.log()  # rows sum to 1; impossible tokens get -inf
        self.V = V
        self.calls = 0
        self.config = SimpleNamespace(max_text_len=64)

    def forward_features(self, image=None, text_ids=None, attn_mode="bidirectional", cache=None, use_cache=False):
        assert attn_mode == "prefix_causal"
        self.calls += 1
        hidden = F.one_hot(text_ids, self.V).double()
        return SimpleNamespace(hidden=hidden, cache=_ToyCache() if use_cache else None)

    def logits_fn(self, h):
        return self.logp[h.argmax(-1)]  # a lookup: one-hot @ logp would turn 0 * -inf into NaN


def row(**p):
    """A probability row over [pad, unk, bos, eos, A, B, C] from keyword probabilities."""
    names = ["pad", "unk", "bos", "eos", "a", "b", "c"]
    return [p.get(n, 0.0) for n in names]


def prompt(*ids):
    return torch.tensor([list(ids)])


# ------------------------------------------------------------------------------ toy models
def test_beam_finds_the_best_sequence_where_greedy_does_not():
    toy = MarkovToy({
        BOS: row(a=0.6, b=0.4),
        A: row(a=0.36, b=0.34, eos=0.30),
        B: row(eos=0.9, a=0.05, b=0.05),
        C: row(eos=1.0), EOS: row(eos=1.0),
    })
    g = greedy_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), max_len=5)
    assert g.tokens.tolist() == [[A, A, A, A, A]]  # the locally best token every time, never EOS
    torch.testing.assert_close(g.log_probs, torch.tensor([math.log(0.6) + 4 * math.log(0.36)], dtype=torch.float64))
    bs = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=2, max_len=5, length_penalty=0.0)
    assert bs.tokens.tolist() == [[B, EOS]]
    assert bs.lengths.tolist() == [2]
    torch.testing.assert_close(bs.log_probs, torch.tensor([math.log(0.4 * 0.9)], dtype=torch.float64))
    assert bs.log_probs.item() > g.log_probs.item()


def test_length_penalty_trades_probability_for_length():
    # [eos] has probability 0.5; [a, b, eos] 0.405: best in total, worse per token
    toy = MarkovToy({
        BOS: row(eos=0.5, a=0.5),
        A: row(eos=0.1, b=0.9),
        B: row(eos=0.9, a=0.05, c=0.05),
        C: row(eos=1.0), EOS: row(eos=1.0),
    })
    short = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=3, max_len=6, length_penalty=0.0)
    assert short.tokens.tolist() == [[EOS]]
    torch.testing.assert_close(short.scores, torch.tensor([math.log(0.5)], dtype=torch.float64))
    long = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=3, max_len=6, length_penalty=1.0)
    assert long.tokens.tolist() == [[A, B, EOS]]
    torch.testing.assert_close(long.scores, torch.tensor([math.log(0.405) / 3], dtype=torch.float64))
    torch.testing.assert_close(long.log_probs, torch.tensor([math.log(0.405)], dtype=torch.float64))
    gnmt = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=3, max_len=6, length_penalty=1.0,
                       length_penalty_style="gnmt")
    # gnmt: log(.5) / 1 = -0.69 vs log(.405) / (8/6) = -0.68: the long one, by a hair
    assert gnmt.tokens.tolist() == [[A, B, EOS]]
    torch.testing.assert_close(gnmt.scores, torch.tensor([math.log(0.405) / (8 / 6)], dtype=torch.float64))


def test_length_normalise_formulas():
    s = torch.tensor([-6.0])
    torch.testing.assert_close(length_normalise(s, 4, 0.5), torch.tensor([-3.0]))
    torch.testing.assert_close(length_normalise(s, 7, 1.0, "gnmt"), torch.tensor([-3.0]))
    torch.testing.assert_close(length_normalise(s, 9, 0.0), s)
    with pytest.raises(ValueError, match="length_penalty_style"):
        length_normalise(s, 3, 1.0, "nope")


def _exhaustive_best(toy, max_len, alpha, style):
    """Best (normalised score, tokens) over every sequence of A/B/C that ends in EOS within
    max_len tokens or reaches max_len without it."""
    best = (-math.inf, None)
    for n in range(1, max_len + 1):
        for body in itertools.product([EOS, A, B, C], repeat=n):
            if EOS in body[:-1]:
                continue
            prev, lp = BOS, 0.0
            for tok in body:
                lp += toy.logp[prev, tok].item()
                prev = tok
            if body[-1] != EOS and n < max_len:
                continue
            score = length_normalise(torch.tensor(lp, dtype=torch.float64), n, alpha, style).item()
            if score > best[0]:
                best = (score, list(body))
    return best


@pytest.mark.parametrize("alpha,style", [(0.0, "power"), (0.6, "power"), (2.0, "power"), (1.0, "gnmt")])
def test_wide_beam_equals_exhaustive_search(alpha, style):
    """With more beams than candidates nothing is pruned and no image stops early, so beam search
    must return the exhaustive optimum of the length-normalised score."""
    g = torch.Generator().manual_seed(int(alpha * 10) + len(style))
    probs = {p: [0, 0, 0] + F.normalize(torch.rand(4, generator=g, dtype=torch.float64), p=1, dim=0).tolist() for p in (BOS, A, B, C)}
    probs[EOS] = row(eos=1.0)
    toy = MarkovToy(probs)
    score, tokens = _exhaustive_best(toy, 4, alpha, style)
    out = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=200, max_len=4,
                      length_penalty=alpha, length_penalty_style=style)
    assert out.tokens[0, : out.lengths[0]].tolist() == tokens
    assert out.scores.item() == pytest.approx(score, abs=1e-9)


def test_eos_stops_each_row_and_the_loop():
    toy = MarkovToy({
        BOS: row(a=1.0), A: row(b=1.0), B: row(eos=1.0), C: row(eos=1.0), EOS: row(eos=1.0),
    })
    prefix = torch.tensor([[BOS, BOS], [BOS, A], [BOS, C]])  # -> a b eos | b eos | eos
    out = greedy_search(toy, toy.logits_fn, prefix_ids=prefix, max_len=10)
    assert out.tokens.tolist() == [[A, B, EOS], [B, EOS, PAD], [EOS, PAD, PAD]]
    assert out.lengths.tolist() == [3, 2, 1]
    assert toy.calls == 3  # the prefix, then two steps: the loop ends once every row has EOS
    toy.calls = 0
    bs = beam_search(toy, toy.logits_fn, prefix_ids=prefix, beam_size=2, max_len=10)
    assert bs.tokens.tolist() == out.tokens.tolist()
    assert toy.calls <= 4
    assert strip_special(out.tokens, EOS) == [[A, B], [B], []]


def test_max_len_cuts_generation_and_suppressed_ids_never_appear():
    toy = MarkovToy({BOS: row(bos=0.9, a=0.1), A: row(pad=0.8, a=0.2), EOS: row(eos=1.0)})
    out = greedy_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), max_len=4)
    assert out.tokens.tolist() == [[A, A, A, A]]  # bos and pad are suppressed by default
    assert out.lengths.tolist() == [4]
    bs = beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=2, max_len=4)
    assert bs.tokens.tolist() == [[A, A, A, A]]
    with pytest.raises(ValueError, match="max_text_len=64"):
        greedy_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), max_len=65)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(toy, toy.logits_fn, prefix_ids=prompt(BOS), beam_size=0)


# ------------------------------------------------------------------------------ the real backbone
@pytest.fixture(scope="module", params=["dense", "mhmoe-h2"])
def tiny(request):
    torch.manual_seed(0)
    model = create_model("tiny", request.param, vocab_size=40, depth=2).double().eval()  # block 1 is MoE
    head = TokenHead(96, 40).double().eval()
    with torch.no_grad():  # sharper next-token distributions that vary with the input
        head.decoder.weight.normal_(0, 0.25)
    image = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    return model, head, image


def test_cached_equals_uncached(tiny):
    model, head, image = tiny
    for fn, kw in ((greedy_search, {}), (beam_search, dict(beam_size=3, length_penalty=0.6))):
        a = fn(model, head, image, max_len=8, use_cache=True, **kw)
        b = fn(model, head, image, max_len=8, use_cache=False, **kw)
        assert a.tokens.tolist() == b.tokens.tolist()
        assert a.lengths.tolist() == b.lengths.tolist()
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-9)
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=1e-9)
    # text-only prompt (causal LM): plain causal mask
    prefix = torch.tensor([[BOS, 7, 9], [BOS, 11, 12]])
    a = beam_search(model, head, prefix_ids=prefix, beam_size=2, max_len=8, use_cache=True)
    b = beam_search(model, head, prefix_ids=prefix, beam_size=2, max_len=8, use_cache=False)
    assert a.tokens.tolist() == b.tokens.tolist()
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-9)


def test_beam_of_one_equals_greedy(tiny):
    model, head, image = tiny
    g = greedy_search(model, head, image, max_len=8)
    for alpha in (0.0, 0.6):
        b = beam_search(model, head, image, beam_size=1, max_len=8, length_penalty=alpha)
        assert b.tokens.tolist() == g.tokens.tolist()
        assert b.lengths.tolist() == g.lengths.tolist()
        torch.testing.assert_close(b.log_probs, g.log_probs, rtol=0, atol=1e-9)
    assert generate(model, head, image, beam_size=1, max_len=8).tokens.tolist() == g.tokens.tolist()


def test_beam_score_is_the_sequence_log_probability(tiny):
    """The reported log-probability equals a teacher-forced forward pass over the chosen text."""
    model, head, image = tiny
    out = beam_search(model, head, image, beam_size=3, max_len=10, length_penalty=0.6)
    for i in range(image.shape[0]):
        n = int(out.lengths[i])
        ids = torch.cat([torch.tensor([BOS]), out.tokens[i, :n]])[None]
        h = model(image[i : i + 1], ids, attn_mode="prefix_causal").text_hidden
        logp = head(h[:, :-1]).log_softmax(-1).gather(-1, ids[:, 1:, None]).sum()
        assert out.log_probs[i].item() == pytest.approx(logp.item(), abs=1e-9)
        assert out.scores[i].item() == pytest.approx(logp.item() / n**0.6, abs=1e-9)
