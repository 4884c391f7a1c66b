"""Autoregressive decoding with the multiway backbone: greedy search and beam search.

The text part of the sequence is decoded with ``attn_mode="prefix_causal"``: text tokens attend to
every image token and causally to earlier text, so a text-only prefix gets a plain causal mask
(language modelling) and an image + ``[bos]`` prefix gives image captioning.

With the key/value cache (``use_cache=True``, the default) the first call runs the image and the
text prefix once and keeps every layer's keys and values; each later step feeds only the newest
token. Beam search reorders (and first expands) the cache with ``KVCache.index_select``. The
uncached path (``use_cache=False``) recomputes the whole prefix at every step: slower, and kept as
the reference the cached path is tested against.

Everything here is plain PyTorch: a decoding function takes the backbone and ``logits_fn``, any
callable mapping hidden states (... x D) to vocabulary logits (... x V), e.g. a ``TokenHead``.

Scores are natural-log probabilities from ``log_softmax`` of the logits (float32, or float64 for
a float64 model). Suppressed ids (by
default ``pad_id`` and ``bos_id``) are set to -inf after the softmax, so they are never generated
and the remaining log-probabilities are the model's own (not renormalised).

Beam search (fairseq / BEiT-3 style):

* at each step every live beam is extended by every token; the ``2 * beam_size`` best
  (cumulative log-probability) candidates of each image are kept;
* a candidate ending in EOS among the ``beam_size`` best becomes a finished hypothesis with the
  length-normalised score ``logprob / lp(length)``, where ``length`` counts the generated tokens
  including EOS (the prefix is not counted) and

      ``length_penalty_style="power"`` (default, fairseq / Hugging Face / UniLM):  lp = length ** alpha
      ``length_penalty_style="gnmt"`` (Wu et al. 2016):  lp = ((5 + length) / 6) ** alpha

  with ``alpha = length_penalty``; alpha = 0 ranks by total log-probability, larger alpha favours
  longer captions;
* the best ``beam_size`` candidates not ending in EOS continue;
* an image stops once it has ``beam_size`` finished hypotheses (fairseq's stopping rule; so
  ``beam_size=1`` is exactly greedy search) or no live beam is left (every continuation has
  probability 0); at ``max_len`` the still-live beams are finished as they are (without EOS);
* the answer is the finished hypothesis with the best normalised score.

Shape legend: B images (or text prompts), K beams, V vocabulary, T generated tokens, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

LogitsFn = Callable[[Tensor], Tensor]
PENALTY_STYLES = ("power", "gnmt")

__all__ = [
    "GenerationOutput", "LogitsFn", "PENALTY_STYLES", "beam_search", "generate", "greedy_search",
    "length_normalise", "strip_special",
]


@dataclass
class GenerationOutput:
    """What the decoding functions return (one sequence per input)."""

    tokens: Tensor
    """B x T long: generated ids (no prefix), EOS included where produced, ``pad_id`` after."""
    lengths: Tensor
    """B long: generated tokens per sequence (EOS counted)."""
    scores: Tensor
    """B float: the ranking score: summed log-probability (greedy), normalised score (beam)."""
    log_probs: Tensor
    """B float: summed log-probability of the generated tokens."""


def length_normalise(score: Tensor, length: Any, alpha: float, style: str = "power") -> Tensor:
    """``score / lp(length)`` (see the module docstring); ``length`` counts generated tokens."""
    if style not in PENALTY_STYLES:
        raise ValueError(f"length_penalty_style={style!r} is invalid: allowed {', '.join(PENALTY_STYLES)}")
    length = torch.as_tensor(length, dtype=score.dtype, device=score.device)
    if style == "power":
        lp = length.clamp(min=1) ** alpha
    else:
        lp = ((5.0 + length) / 6.0) ** alpha
    return score / lp


def strip_special(tokens: Tensor, eos_id: int, pad_id: int = 0, drop: Sequence[int] = ()) -> List[List[int]]:
    """Per row, the ids before the first EOS, without padding and ``drop`` ids (ready to detokenise)."""
    out = []
    skip = {pad_id, *drop}
    for row in tokens.tolist():
        ids = []
        for i in row:
            if i == eos_id:
                break
            if i not in skip:
                ids.append(i)
        out.append(ids)
    return out


class _Decoder:
    """Runs the backbone for decoding, cached or not: ``start`` -> log-probs of the first new
    token; ``step(tokens)`` -> log-probs of the next one; ``reorder(index)`` selects rows."""

    def __init__(self, backbone: nn.Module, logits_fn: LogitsFn, use_cache: bool, suppress: Sequence[int]):
        self.backbone, self.logits_fn, self.use_cache = backbone, logits_fn, use_cache
        self.suppress = sorted(set(int(i) for i in suppress))
        self.cache = None
        self.image: Optional[Tensor] = None
        self.ids: Optional[Tensor] = None

    def _log_probs(self, hidden_BD: Tensor) -> Tensor:
        logits_BV = self.logits_fn(hidden_BD)
        if logits_BV.dtype not in (torch.float32, torch.float64):
            logits_BV = logits_BV.float()  # half-precision logits: softmax in float32
        logp_BV = logits_BV.log_softmax(dim=-1)
        banned = [i for i in self.suppress if i < logp_BV.shape[-1]]
        if banned:
            logp_BV[:, banned] = float("-inf")
        return logp_BV

    def start(self, image: Optional[Tensor], prefix_ids: Tensor) -> Tensor:
        out = self.backbone.forward_features(
            image=image, text_ids=prefix_ids, attn_mode="prefix_causal", use_cache=self.use_cache
        )
        if self.use_cache:
            self.cache = out.cache
        else:
            self.image, self.ids = image, prefix_ids
        return self._log_probs(out.hidden[:, -1])

    def step(self, tokens_B: Tensor) -> Tensor:
        if self.use_cache:
            out = self.backbone.forward_features(
                text_ids=tokens_B[:, None], attn_mode="prefix_causal", cache=self.cache, use_cache=True
            )
            self.cache = out.cache
        else:
            self.ids = torch.cat([self.ids, tokens_B[:, None]], dim=1)
            out = self.backbone.forward_features(image=self.image, text_ids=self.ids, attn_mode="prefix_causal")
        return self._log_probs(out.hidden[:, -1])

    def reorder(self, index: Tensor) -> None:
        if self.use_cache:
            self.cache = self.cache.index_select(index)
        else:
            self.image = None if self.image is None else self.image.index_select(0, index)
            self.ids = self.ids.index_select(0, index)


def _prepare(
    backbone: nn.Module, image: Optional[Tensor], prefix_ids: Optional[Tensor], bos_id: int, max_len: int
) -> Tuple[Tensor, int, torch.device]:
    if image is None and prefix_ids is None:
        raise ValueError("decoding needs an image, a prefix_ids prompt, or both")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    ref = image if image is not None else prefix_ids
    B, device = ref.shape[0], ref.device
    if prefix_ids is None:
        prefix_ids = torch.full((B, 1), bos_id, dtype=torch.long, device=device)
    if prefix_ids.dim() != 2 or prefix_ids.shape[0] != B or prefix_ids.shape[1] < 1:
        raise ValueError(f"prefix_ids must be B x P with B={B} and P >= 1, got {tuple(prefix_ids.shape)}")
    limit = getattr(getattr(backbone, "config", None), "max_text_len", None)
    # the last generated token is never fed back, so the text positions used are P + max_len - 1
    if limit is not None and prefix_ids.shape[1] + max_len - 1 > limit:
        raise ValueError(
            f"max_len={max_len} with a prefix of {prefix_ids.shape[1]} tokens needs "
            f"{prefix_ids.shape[1] + max_len - 1} text positions, but the model has max_text_len={limit}; "
            f"use max_len <= {limit - prefix_ids.shape[1] + 1}"
        )
    return prefix_ids, B, device


@torch.no_grad()
def greedy_search(
    backbone: nn.Module,
    logits_fn: LogitsFn,
    image: Optional[Tensor] = None,
    prefix_ids: Optional[Tensor] = None,
    *,
    max_len: int = 32,
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    use_cache: bool = True,
    suppress_ids: Optional[Sequence[int]] = None,
) -> GenerationOutput:
    """Pick the most probable token at every step until EOS or ``max_len`` generated tokens.

    Args:
        backbone: a ``MultiwayTransformer`` (anything with its ``forward_features`` interface).
        logits_fn: hidden states (... x D) -> logits (... x V).
        image: B x C x H x W (normalised) or None (text-only prompt).
        prefix_ids: B x P text prompt without padding; default ``[[bos_id]] * B``.
        max_len: most tokens generated after the prefix (EOS included).
        use_cache: decode with the key/value cache (False: recompute the prefix every step).
        suppress_ids: ids never generated; default ``(pad_id, bos_id)``.
    """
    prefix_ids, B, device = _prepare(backbone, image, prefix_ids, bos_id, max_len)
    dec = _Decoder(backbone, logits_fn, use_cache, (pad_id, bos_id) if suppress_ids is None else suppress_ids)
    logp_BV = dec.start(image, prefix_ids)
    tokens_BT = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)
    total_B = torch.zeros(B, dtype=logp_BV.dtype, device=device)
    lengths_B = torch.zeros(B, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_len):
        best_B, next_B = logp_BV.max(dim=-1)
        next_B = torch.where(done_B, torch.full_like(next_B, pad_id), next_B)
        total_B = total_B + torch.where(done_B, torch.zeros_like(best_B), best_B)
        lengths_B = lengths_B + (~done_B).long()
        tokens_BT[:, t] = next_B
        done_B = done_B | (next_B == eos_id)
        if bool(done_B.all()) or t == max_len - 1:
            break
        logp_BV = dec.step(next_B)  # finished rows are fed padding; their outputs are never read
    T = int(lengths_B.max()) if B else 0
    return GenerationOutput(tokens=tokens_BT[:, :T], lengths=lengths_B, scores=total_B, log_probs=total_B.clone())


@torch.no_grad()
def beam_search(
    backbone: nn.Module,
    logits_fn: LogitsFn,
    image: Optional[Tensor] = None,
    prefix_ids: Optional[Tensor] = None,
    *,
    beam_size: int = 3,
    max_len: int = 32,
    length_penalty: float = 0.6,
    length_penalty_style: str = "power",
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    use_cache: bool = True,
    suppress_ids: Optional[Sequence[int]] = None,
) -> GenerationOutput:
    """Beam search (see the module docstring for the exact rules); arguments as
    :func:`greedy_search`, plus ``beam_size`` (K), ``length_penalty`` (alpha) and
    ``length_penalty_style`` ("power": score / length ** alpha; "gnmt": score / ((5 + length) / 6) ** alpha).
    """
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    if length_penalty_style not in PENALTY_STYLES:
        raise ValueError(
            f"length_penalty_style={length_penalty_style!r} is invalid: allowed {', '.join(PENALTY_STYLES)}"
        )
    prefix_ids, B, device = _prepare(backbone, image, prefix_ids, bos_id, max_len)
    K = beam_size
    dec = _Decoder(backbone, logits_fn, use_cache, (pad_id, bos_id) if suppress_ids is None else suppress_ids)
    logp_BV = dec.start(image, prefix_ids)  # the prefix is run once per input, then copied K times
    V = logp_BV.shape[-1]
    dec.reorder(torch.arange(B, device=device).repeat_interleave(K))
    logp_RV = logp_BV.repeat_interleave(K, dim=0)  # R = B * K rows, beam k of input b at b * K + k
    # only beam 0 is live at the start: the K copies must not yield K identical hypotheses
    cum_BK = torch.full((B, K), float("-inf"), dtype=logp_BV.dtype, device=device)
    cum_BK[:, 0] = 0.0
    seqs_RT = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    finished: List[List[Tuple[float, float, List[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    n_cand = min(2 * K, K * V)
    rank_C = torch.arange(n_cand, device=device)

    def normalise(score: Tensor, length: int) -> Tensor:
        return length_normalise(score, length, length_penalty, length_penalty_style)

    for t in range(max_len):
        length = t + 1
        cand_BC = (cum_BK[:, :, None] + logp_RV.view(B, K, V)).view(B, K * V)
        top_BC, idx_BC = cand_BC.topk(n_cand, dim=1)  # sorted, best first
        beam_BC, tok_BC = idx_BC // V, idx_BC % V
        valid_BC = torch.isfinite(top_BC)
        eos_BC = tok_BC == eos_id

        # EOS among the K best candidates -> finished hypotheses
        fin_BC = eos_BC & valid_BC & (rank_C < K)[None, :]
        if bool(fin_BC.any()):
            norm_BC = normalise(top_BC, length)
            for b, c in fin_BC.nonzero().tolist():
                if done[b]:
                    continue
                row = b * K + int(beam_BC[b, c])
                seq = seqs_RT[row].tolist() + [eos_id]
                finished[b].append((float(norm_BC[b, c]), float(top_BC[b, c]), seq))

        # the K best candidates that do not end in EOS continue
        key_BC = rank_C[None, :] + n_cand * eos_BC.long()
        pick_BK = key_BC.argsort(dim=1)[:, :K]
        new_cum_BK = top_BC.gather(1, pick_BK)
        dead_BK = eos_BC.gather(1, pick_BK) | ~valid_BC.gather(1, pick_BK)
        cum_BK = new_cum_BK.masked_fill(dead_BK, float("-inf"))
        live_B = (~dead_BK).any(dim=1).tolist()
        for b in range(B):  # K finished hypotheses, or nothing left to extend
            done[b] = done[b] or len(finished[b]) >= K or not live_B[b]
        src_R = (torch.arange(B, device=device)[:, None] * K + beam_BC.gather(1, pick_BK)).view(-1)
        next_R = tok_BC.gather(1, pick_BK).view(-1)
        seqs_RT = torch.cat([seqs_RT.index_select(0, src_R), next_R[:, None]], dim=1)

        if t == max_len - 1:  # out of length: the live beams finish as they are
            norm_BK = normalise(cum_BK, length)
            for b in range(B):
                if done[b]:
                    continue
                for k in range(K):
                    if torch.isfinite(cum_BK[b, k]):
                        finished[b].append((float(norm_BK[b, k]), float(cum_BK[b, k]), seqs_RT[b * K + k].tolist()))
            break
        if all(done):
            break
        dec.reorder(src_R)
        logp_RV = dec.step(next_R)

    best = [max(f, key=lambda h: h[0]) if f else (float("-inf"), float("-inf"), []) for f in finished]
    T = max((len(h[2]) for h in best), default=0)
    tokens_BT = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    for b, (_, _, seq) in enumerate(best):
        if seq:
            tokens_BT[b, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
    return GenerationOutput(
        tokens=tokens_BT,
        lengths=torch.tensor([len(h[2]) for h in best], dtype=torch.long, device=device),
        scores=torch.tensor([h[0] for h in best], dtype=logp_BV.dtype, device=device),
        log_probs=torch.tensor([h[1] for h in best], dtype=logp_BV.dtype, device=device),
    )


def generate(
    backbone: nn.Module,
    logits_fn: LogitsFn,
    image: Optional[Tensor] = None,
    prefix_ids: Optional[Tensor] = None,
    *,
    beam_size: int = 1,
    max_len: int = 32,
    length_penalty: float = 0.6,
    length_penalty_style: str = "power",
    bos_id: int = 2,
    eos_id: int = 3,
    pad_id: int = 0,
    use_cache: bool = True,
    suppress_ids: Optional[Sequence[int]] = None,
) -> GenerationOutput:
    """Greedy search for ``beam_size == 1``, else beam search (same results for K = 1; greedy is
    cheaper)."""
    common = dict(max_len=max_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, use_cache=use_cache,
                  suppress_ids=suppress_ids)
    if beam_size == 1:
        return greedy_search(backbone, logits_fn, image, prefix_ids, **common)
    return beam_search(backbone, logits_fn, image, prefix_ids, beam_size=beam_size, length_penalty=length_penalty,
                       length_penalty_style=length_penalty_style, **common)
