"""The multiway MH-MoE transformer backbone.

One sequence ``[image CLS, patches..., text BOS, tokens..., EOS]`` (either part may be absent)
goes through pre-norm blocks of shared self-attention and a per-way FFN (vision, language, and in
the top ``vl_layers`` blocks vision-language for the tokens of image-text input). The way of every
token is an explicit id computed here from the inputs (no module state), so one forward can mix
image and text tokens and NLVR2 can run two images through the same weights.

Shape legend: B batch, N image tokens (CLS + patches), L text tokens, S = N + L sequence,
Q new positions in this call, K key positions (cached + new), D width.

Padding convention: ``text_pad_mask`` and every ``padding_mask`` here are True at padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmmoe.layers.attention import KV, Attention, attention_mask
from mmmoe.layers.embeddings import LANGUAGE, VISION, VL, TextEmbedding, VisionEmbedding
from mmmoe.layers.multiway import MultiwayFFN
from mmmoe.models.config import ATTN_MODES, ModelConfig
from mmmoe.moe import MHMoE, MoEOutput
from mmmoe.moe.experts import GroupedExperts

#: the kinds of input a forward can take: image only, text only, image and text together
INPUT_KINDS = ("image", "text", "image_text")


@dataclass
class KVCache:
    """Keys and values of the positions processed so far, for incremental decoding.

    ``modality`` / ``padding`` (B x K) describe the cached positions (the attention mask of the
    next step needs them); ``text_len`` is the next text position; ``image_text`` says whether the
    cached input had an image (then new text tokens take the vision-language way in VL blocks).
    """

    layers: List[Optional[KV]]
    modality: Tensor
    padding: Optional[Tensor]
    text_len: int
    image_text: bool

    def index_select(self, index_B: Tensor) -> "KVCache":
        """The cache of the samples ``index_B`` (beam search reorders and expands with this)."""
        return KVCache(
            layers=[None if kv is None else (kv[0].index_select(0, index_B), kv[1].index_select(0, index_B))
                    for kv in self.layers],
            modality=self.modality.index_select(0, index_B),
            padding=None if self.padding is None else self.padding.index_select(0, index_B),
            text_len=self.text_len,
            image_text=self.image_text,
        )


@dataclass
class BackboneOutput:
    """What ``forward_features`` returns."""

    hidden: Tensor
    """B x Q x D final-normed hidden states of this call's positions (image part first)."""
    num_image_tokens: int
    """Image positions at the start of ``hidden`` (CLS + patches; 0 without an image)."""
    padding_mask: Optional[Tensor]
    """B x Q, True = padding (None when nothing is padded)."""
    aux_loss: Tensor
    """Sum over MoE layers and ways of each layer's weighted aux loss (MoEOutput.loss)."""
    moe: Dict[str, MoEOutput] = field(default_factory=dict)
    """Per MoE layer and way, keyed ``"<block index>.<way>"`` (e.g. ``"3.vision"``)."""
    cache: Optional[KVCache] = None
    """Filled when ``use_cache=True``."""

    @property
    def image_hidden(self) -> Tensor:
        return self.hidden[:, : self.num_image_tokens]

    @property
    def text_hidden(self) -> Tensor:
        return self.hidden[:, self.num_image_tokens :]


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + multiway_ffn(norm2(x))."""

    def __init__(self, cfg: ModelConfig, index: int, drop_path: float):
        super().__init__()
        self.index = index
        D = cfg.dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = Attention(D, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_drop=cfg.dropout, bitnet=cfg.bitnet_all)
        self.norm2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        moe = cfg.moe if cfg.is_moe_layer(index) else None
        self.ffn = MultiwayFFN(D, cfg.ffn_hidden, cfg.activation, moe=moe, vl=cfg.has_vl_way(index),
                               bitnet=cfg.bitnet_all)
        self.ffn_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x_BQD: Tensor, way_BQ: Tensor, pad_BQ: Optional[Tensor], mask: Optional[Tensor], kv: Optional[KV]
    ) -> Tuple[Tensor, KV, Dict[str, MoEOutput]]:
        a_BQD, kv = self.attn(self.norm1(x_BQD), mask, kv)
        x_BQD = x_BQD + self.drop_path(a_BQD)
        f_BQD, stats = self.ffn(self.norm2(x_BQD), way_BQ, pad_BQ)
        x_BQD = x_BQD + self.drop_path(self.ffn_drop(f_BQD))
        return x_BQD, kv, stats


class MultiwayTransformer(nn.Module):
    """Embeddings + multiway blocks + final norm. Heads live in ``mmmoe.models.heads``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"MultiwayTransformer expects a ModelConfig, got {type(config).__name__}")
        self.config = c = config
        self.vision_embed = VisionEmbedding(c.image_size, c.patch_size, c.in_chans, c.dim)
        self.text_embed = TextEmbedding(c.vocab_size, c.max_text_len, c.dim)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([Block(c, i, rates[i]) for i in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.apply(self._init_weights)
        for m in self.modules():  # the papers' init of head/merge layers and routers stays
            if isinstance(m, MHMoE):
                m.reset_parameters()

    INIT_STD = 0.02
    """BEiT-3's initialisation: every linear weight N(0, 0.02) (truncated at +-2), zero biases."""

    @classmethod
    def _init_weights(cls, m: nn.Module) -> None:
        """One scheme for every linear weight: attention, dense FFNs, the shared expert and the routed
        experts (each expert matrix of the 3-D ``GroupedExperts`` tensors gets the same
        distribution as a dense FFN's ``nn.Linear`` weight). Routers and MH-MoE head / merge layers
        are re-initialised afterwards by ``MHMoE.reset_parameters`` (the papers' choices)."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=cls.INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, GroupedExperts):
            nn.init.trunc_normal_(m.w_in, std=cls.INIT_STD)
            nn.init.trunc_normal_(m.w_out, std=cls.INIT_STD)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ helpers
    @property
    def num_image_tokens(self) -> int:
        return self.vision_embed.num_tokens

    def moe_layers(self) -> Dict[str, MHMoE]:
        """``{"<block>.<way>": MHMoE}`` for every MoE FFN, in block order."""
        return {
            f"{i}.{name}": way
            for i, blk in enumerate(self.blocks)
            for name, way in blk.ffn.ways.items()
            if isinstance(way, MHMoE)
        }

    def unused_parameters(self, inputs: Iterable[str], masked_images: bool = False) -> List[str]:
        """Names of the parameters that no forward on the given input kinds reaches.

        ``inputs``: a subset of ``INPUT_KINDS`` ("image", "text", "image_text"); ``masked_images``:
        whether image inputs carry a patch mask (masked image modelling uses the mask token).
        Image-text input sends every token through the vision-language way of the top blocks, so
        their vision and language ways only serve image-only and text-only input; text-only input
        never reaches the vision embedding or a vision way. A task that never feeds some kind
        (VQA: image-text only; a language model: text only) freezes these, so distributed training
        expects gradients exactly for what its loss uses."""
        kinds = set(inputs)
        if not kinds or not kinds <= set(INPUT_KINDS):
            raise ValueError(f"inputs={sorted(kinds)} is invalid: a non-empty subset of {list(INPUT_KINDS)}")
        has_image = bool(kinds & {"image", "image_text"})
        has_text = bool(kinds & {"text", "image_text"})
        unused_prefixes = []
        if not has_image:
            unused_prefixes.append("vision_embed.")
        elif not masked_images:
            unused_prefixes.append("vision_embed.mask_token")
        if not has_text:
            unused_prefixes.append("text_embed.")
        for i, blk in enumerate(self.blocks):
            if blk.ffn.has_vl:  # image-text tokens take the vl way here
                used = {"vision": "image" in kinds, "language": "text" in kinds, "vl": "image_text" in kinds}
            else:
                used = {"vision": has_image, "language": has_text}
            unused_prefixes += [f"blocks.{i}.ffn.ways.{w}." for w, u in used.items() if not u]
        return [n for n, _ in self.named_parameters() if n.startswith(tuple(unused_prefixes))]

    def no_weight_decay(self) -> set:
        """Parameter names that should not be weight-decayed (embeddings, positions, tokens)."""
        return {"vision_embed.cls_token", "vision_embed.mask_token", "vision_embed.pos_embed",
                "text_embed.pos_embed", "text_embed.token_embed.weight"}

    # ------------------------------------------------------------------ forward
    def forward_features(
        self,
        image: Optional[Tensor] = None,
        text_ids: Optional[Tensor] = None,
        text_pad_mask: Optional[Tensor] = None,
        image_mask: Optional[Tensor] = None,
        attn_mode: str = "bidirectional",
        cache: Optional[KVCache] = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Run the backbone on an image, a text, or both.

        Args:
            image: B x C x H x W float (normalised), or None.
            text_ids: B x L long, ``[bos] + tokens + [eos]`` right-padded, or None.
            text_pad_mask: B x L bool, True = padding; None = no padding.
            image_mask: B x N (or B x Hp x Wp) bool, True = masked patch (replaced by the mask
                token, SimMIM style), or None.
            attn_mode: ``"bidirectional"`` or ``"prefix_causal"`` (image bidirectional, text
                causal over itself and attending to the whole image).
            cache: a ``KVCache`` from an earlier call; ``text_ids`` then continue the text (no
                image may be given: it is in the cache).
            use_cache: return a cache holding every position so far.
        """
        c = self.config
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"attn_mode={attn_mode!r} is invalid: allowed {', '.join(ATTN_MODES)}")
        if image is None and text_ids is None:
            raise ValueError("forward_features needs an image, text_ids, or both")
        if cache is not None and image is not None:
            raise ValueError("an image cannot follow cached positions: pass it in the first call")
        if cache is not None and attn_mode != "prefix_causal":
            raise ValueError("incremental decoding with a cache needs attn_mode='prefix_causal'")
        parts, modality, pads = [], [], []
        B = (image if image is not None else text_ids).shape[0]
        device = (image if image is not None else text_ids).device
        N = 0
        if image is not None:
            if image.dim() != 4 or image.shape[1:] != (c.in_chans, c.image_size, c.image_size):
                raise ValueError(
                    f"image must be B x {c.in_chans} x {c.image_size} x {c.image_size}, got {tuple(image.shape)}"
                )
            x_img = self.vision_embed(image, image_mask)
            N = x_img.shape[1]
            parts.append(x_img)
            modality.append(torch.full((B, N), VISION, dtype=torch.long, device=device))
            pads.append(torch.zeros(B, N, dtype=torch.bool, device=device))
        if text_ids is not None:
            if text_ids.dim() != 2 or text_ids.shape[0] != B:
                raise ValueError(f"text_ids must be B x L with B={B}, got {tuple(text_ids.shape)}")
            start = cache.text_len if cache is not None else 0
            x_txt = self.text_embed(text_ids, start=start)
            L = text_ids.shape[1]
            parts.append(x_txt.to(parts[0].dtype) if parts else x_txt)
            modality.append(torch.full((B, L), LANGUAGE, dtype=torch.long, device=device))
            if text_pad_mask is not None:
                if text_pad_mask.shape != text_ids.shape or text_pad_mask.dtype != torch.bool:
                    raise ValueError("text_pad_mask must be bool with the shape of text_ids (True = padding)")
                pads.append(text_pad_mask)
            else:
                pads.append(torch.zeros(B, L, dtype=torch.bool, device=device))
        x_BQD = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        mod_BQ = torch.cat(modality, dim=1) if len(modality) > 1 else modality[0]
        pad_BQ = torch.cat(pads, dim=1) if len(pads) > 1 else pads[0]
        image_text = (image is not None and text_ids is not None) or (cache is not None and cache.image_text)

        # keys = cached positions + these
        if cache is not None:
            mod_BK = torch.cat([cache.modality, mod_BQ], dim=1)
            old_pad = cache.padding if cache.padding is not None else torch.zeros_like(cache.modality, dtype=torch.bool)
            pad_BK = torch.cat([old_pad, pad_BQ], dim=1)
        else:
            mod_BK, pad_BK = mod_BQ, pad_BQ
        any_pad = bool(pad_BK.any())
        mask = attention_mask(
            pad_BK if any_pad else None, mod_BK, attn_mode, num_queries=x_BQD.shape[1], vision_id=VISION
        )
        ffn_pad = pad_BQ if any_pad else None
        way_base = mod_BQ
        way_vl = torch.full_like(mod_BQ, VL) if image_text else mod_BQ

        stats: Dict[str, MoEOutput] = {}
        new_kv: List[Optional[KV]] = []
        ckpt = c.grad_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        for i, blk in enumerate(self.blocks):
            way = way_vl if blk.ffn.has_vl else way_base
            kv_in = cache.layers[i] if cache is not None else None
            if ckpt:
                x_BQD, kv, st = checkpoint(blk, x_BQD, way, ffn_pad, mask, kv_in, use_reentrant=False)
            else:
                x_BQD, kv, st = blk(x_BQD, way, ffn_pad, mask, kv_in)
            new_kv.append(kv if use_cache else None)
            for name, out in st.items():
                stats[f"{i}.{name}"] = out
        x_BQD = self.norm(x_BQD)
        aux = x_BQD.new_zeros((), dtype=torch.float32)
        for out in stats.values():
            aux = aux + out.loss
        new_cache = None
        if use_cache:
            text_len = (cache.text_len if cache is not None else 0) + (0 if text_ids is None else text_ids.shape[1])
            new_cache = KVCache(new_kv, mod_BK, pad_BK if any_pad else None, text_len, image_text)
        return BackboneOutput(
            hidden=x_BQD, num_image_tokens=N, padding_mask=pad_BQ if any_pad else None,
            aux_loss=aux, moe=stats, cache=new_cache,
        )

    def forward(self, *args, **kwargs) -> BackboneOutput:
        return self.forward_features(*args, **kwargs)

