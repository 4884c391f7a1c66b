"""Block-wise patch masks and BERT-style token masks."""

from collections import deque

import pytest
import torch

from data_pipelines.masking import (
    BLOCK_ASPECT,
    IGNORE_INDEX,
    IMAGE_MASK_RATIO,
    IMAGE_TEXT_MASK_RATIO,
    MIN_BLOCK_PATCHES,
    TEXT_ONLY_MASK_RATIO,
    block_mask,
    block_mask_and_blocks,
    block_masks,
    mlm_mask,
    special_ids_of,
)


def components(mask_HW: torch.Tensor) -> list:
    """Sizes of the 4-connected components of True cells."""
    H, W = mask_HW.shape
    m = mask_HW.tolist()
    seen = [[False] * W for _ in range(H)]
    sizes = []
    for i in range(H):
        for j in range(W):
            if m[i][j] and not seen[i][j]:
                seen[i][j] = True
                queue, n = deque([(i, j)]), 0
                while queue:
                    a, b = queue.popleft()
                    n += 1
                    for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= c < H and 0 <= d < W and m[c][d] and not seen[c][d]:
                            seen[c][d] = True
                            queue.append((c, d))
                sizes.append(n)
    return sizes


@pytest.mark.parametrize(
    "h,w,ratio", [(14, 14, 0.4), (16, 16, 0.4), (24, 24, 0.4), (7, 9, 0.5), (14, 14, 0.75), (3, 3, 0.4), (14, 14, 0.0), (4, 4, 1.0)]
)
def test_block_mask_count_is_exact(h, w, ratio):
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        m = block_mask(h, w, mask_ratio=ratio, generator=g)
        assert m.shape == (h, w) and m.dtype == torch.bool
        assert int(m.sum()) == round(ratio * h * w)


def test_block_mask_forms_blocks():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        m = block_mask(14, 14, mask_ratio=0.4, min_block=16, generator=g)
        sizes = components(m)
        assert sum(sizes) == 78
        # every blob holds at least one whole rectangle of >= 16 patches, and the top-up only grows blobs
        assert min(sizes) >= 16
        assert len(sizes) <= 78 // 16


def test_block_shapes_and_defaults():
    assert IMAGE_MASK_RATIO == 0.4 and MIN_BLOCK_PATCHES == 16
    assert BLOCK_ASPECT[0] == pytest.approx(0.3) and BLOCK_ASPECT[1] == pytest.approx(1 / 0.3)
    g = torch.Generator().manual_seed(3)
    aspects, from_blocks = [], []
    for _ in range(300):
        m, blocks = block_mask_and_blocks(14, 14, generator=g)  # the defaults: ratio 0.4, >= 16, 0.3..3.3
        assert int(m.sum()) == round(0.4 * 196) == 78
        union = torch.zeros(14, 14, dtype=torch.bool)
        for top, left, h, w in blocks:
            assert h * w >= 16
            assert 0.3 <= h / w <= 1 / 0.3
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            union[top : top + h, left : left + w] = True
            aspects.append(h / w)
        assert not (union & ~m).any()  # every rectangle is masked; the rest is the top-up
        from_blocks.append(int(union.sum()) / 78)
    assert min(aspects) < 0.5 and max(aspects) > 2.0  # the whole aspect range is used
    assert sum(from_blocks) / len(from_blocks) > 0.75  # mostly rectangles, topped up at the edges


def test_block_mask_top_up_from_nothing_stays_one_blob():
    # 9 patches to mask but a block needs 16: everything comes from the top-up, grown from one seed
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        m = block_mask(5, 5, mask_ratio=0.36, min_block=16, generator=g)
        assert int(m.sum()) == 9
        assert len(components(m)) == 1


def test_block_mask_is_reproducible_and_varied():
    a = block_mask(14, 14, generator=torch.Generator().manual_seed(5))
    b = block_mask(14, 14, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(5)
    masks = block_masks(16, 14, 14, generator=g)
    assert masks.shape == (16, 14, 14)
    assert len({m.numpy().tobytes() for m in masks}) == 16


def test_block_mask_validates():
    with pytest.raises(ValueError, match="mask_ratio"):
        block_mask(14, 14, mask_ratio=1.5)
    with pytest.raises(ValueError, match="aspect"):
        block_mask(14, 14, aspect=(2.0, 1.0))


SPECIAL = (0, 1, 2, 3)  # pad, bos, eos, mask
PAD, BOS, EOS, MASK = SPECIAL


def random_batch(B, L, vocab, g):
    ids = torch.randint(4, vocab, (B, L), generator=g)
    ids[:, 0] = BOS
    lengths = torch.randint(L // 2, L, (B,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n] = EOS
        ids[i, n + 1 :] = PAD
    return ids


def test_mlm_mask_counts_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = random_batch(64, 40, 500, g)
    inp, labels = mlm_mask(ids, 0.15, MASK, 500, SPECIAL, generator=g)
    special = torch.isin(ids, torch.tensor(SPECIAL))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any()
    assert torch.equal(inp[special], ids[special])  # specials and padding untouched
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inp[~chosen], ids[~chosen])  # nothing changes outside the chosen positions
    n = (~special).sum(1)
    assert torch.equal(chosen.sum(1), torch.round(n.double() * 0.15).long().clamp(min=1))


def test_mlm_mask_80_10_10():
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = random_batch(400, 256, vocab, g)
    inp, labels = mlm_mask(ids, 0.5, MASK, vocab, SPECIAL, generator=g)
    chosen = labels != IGNORE_INDEX
    total = int(chosen.sum())
    assert total > 30000
    to_mask = int((chosen & (inp == MASK)).sum()) / total
    kept = int((chosen & (inp == ids)).sum()) / total
    replaced = chosen & (inp != MASK) & (inp != ids)
    assert abs(to_mask - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01  # includes random draws that hit the same id (1 in 996)
    assert abs(int(replaced.sum()) / total - 0.1) < 0.01
    assert not torch.isin(inp[replaced], torch.tensor(SPECIAL)).any()


def test_mlm_mask_at_least_one_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    one = torch.tensor([BOS, 17, EOS, PAD, PAD])
    inp, labels = mlm_mask(one, 0.15, MASK, 100, SPECIAL, generator=g)  # round(0.15) = 0 -> still 1
    assert labels.tolist() == [IGNORE_INDEX, 17, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert inp.shape == one.shape
    only_special = torch.tensor([[BOS, EOS, PAD]])
    inp, labels = mlm_mask(only_special, 0.5, MASK, 100, SPECIAL, generator=g)
    assert (labels == IGNORE_INDEX).all() and torch.equal(inp, only_special)
    inp, labels = mlm_mask(random_batch(4, 20, 100, g), 0.0, MASK, 100, SPECIAL, generator=g)
    assert (labels == IGNORE_INDEX).all()


def test_mlm_defaults_and_special_ids():
    assert TEXT_ONLY_MASK_RATIO == 0.15 and IMAGE_TEXT_MASK_RATIO == 0.5

    class Tok:
        pad_id, bos_id, eos_id, mask_id, vocab_size = 0, 1, 2, 3, 100

    assert sorted(special_ids_of(Tok())) == [0, 1, 2, 3]
