"""WebDataset readers: shards (see ``data_pipelines/schema.py``) -> batch dicts of tensors.

The package, one module per stage kind (``from data_pipelines import readers`` gives all the
public names below):

    errors      SKIP_KINDS, SampleError, SkipCounter: bad data is counted by kind and skipped
    shardlists  shard lists (EpochShardList, SeededResampledShards, expand_urls, manifest_total),
                the rank / worker split (split_by_node, EvalNodeSplit, split_by_worker) and the
                rank lookup every part of the project uses (node_info, worker_info, is_rank_zero)
    tars        tar_to_samples: the checked tar stream -> raw byte samples
    decode      bytes -> fields (Decode*), encode_text, vqa_soft_scores
    collate     fields -> batch tensors (Collate, stack_images, normalize_images, pad_text)
    pipelines   the readers (image_text / image / text / vqa / nlvr2 / caption _pipeline),
                Pipeline, EpochLoader, make_loader, SeededShuffle, WeightedMix

Every reader is one explicit list of stages, read top to bottom (``reader_stages`` + a decode map
+ ``batch_stages``):

    shard list     EpochShardList (each shard once per epoch, order reshuffled per epoch, the same
                   order on every rank) or SeededResampledShards (infinite, sampled with
                   replacement by a generator seeded by (seed, epoch, rank, worker));
                   urls are brace patterns, ``<prefix>.manifest.json`` paths, or lists of them
    split_by_node  shard i goes to rank i % world_size        (epoch mode only; evaluation readers
                   with fewer shards than ranks split by sample: EvalNodeSplit)
    split_by_worker  then to DataLoader worker j % num_workers (epoch mode only)
    tar_to_samples read the tar stream (``tario``: checked headers, bounded member sizes), group
                   members by key; only the members the reader needs are read (anything else,
                   e.g. a ``.pyd`` / ``.pth`` pickle, is skipped unread)
    SeededShuffle  sample shuffle buffer over the raw bytes (train only), seeded by
                   (seed, epoch, rank, worker)
    wds.map        our decode: image bytes -> PIL (JPEG draft) -> crop/resize -> uint8 array,
                   UTF-8 text -> token ids, JSON -> task fields. Nothing is ever unpickled:
                   webdataset's ``.decode()`` is not used anywhere.
    wds.batched    collate: normalise images into one float tensor (or stack them as uint8 with
                   ``normalize=False``; see ``normalize_images``), pad text, draw masks

Reproducibility: nothing draws from the global RNGs. Crops, flips, caption choice (decode) and
masks (collate) draw from generators that ``Pipeline`` seeds at the start of each pass from
(seed, epoch, rank, worker, stage) (``StreamRandom``), so a batch depends only on the seed and its
position in the stream: runs repeat bitwise, with any worker count, and ``EpochLoader.resume``
can replay a pass up to the batch where an interrupted run stopped.

Rank and world size come from torch.distributed when it is initialised, else from the RANK and
WORLD_SIZE environment variables; worker id and count from the DataLoader's worker info. In epoch
mode every sample is produced exactly once per epoch over all ranks and workers (when there are
fewer shards than ranks x workers, some readers get none: write more, smaller shards). Ranks can
receive different numbers of batches; for DDP training prefer ``resampled=True`` with
``epoch_samples`` or shard counts that divide evenly.

Bad data never stops a reader: a ``SkipCounter`` (the handler of every stage) counts it by kind
(``SKIP_KINDS``), logs at a bounded rate (logger ``data_pipelines.readers``) and never sleeps.
Counts live in shared memory, so the main process sees what the DataLoader workers skipped;
``EpochLoader`` closes each epoch with one summary line (``SkipCounter.report``), and
``datamodules.SkipReportCallback`` logs the per-epoch counts as metrics.

Batch dicts (B batch, L text length, Hp x Wp patch grid; images are ImageNet-normalised float32):

    image_text   image (B,3,H,W), image_mask (B,Hp,Wp) bool True = masked patch,
                 text_ids (B,L) long (MLM-corrupted), text_pad_mask (B,L) bool, mlm_labels (B,L)
    image        image, image_mask
    text         text_ids, text_pad_mask, mlm_labels (when mask_ratio is set), lang [str]
    vqa          image, text_ids, text_pad_mask, question_id (B,) long,
                 vqa_targets (B,num_answers) float soft scores min(1, n/3), answers [[str]]
                 (the last two only with_answers=True)
    nlvr2        image_left, image_right, text_ids, text_pad_mask, label (B,) long
                 (1 true, 0 false, -1 unknown), identifier [str]
    caption      image, image_id (B,) long, caption_ids (B,L) long, caption_pad_mask (B,L) bool,
                 captions [[str]] (all references)
    every batch  key [str] (the samples' ``__key__``)

PADDING CONVENTION: every ``*_pad_mask`` is True at padding positions (the same convention as the
MH-MoE layer's ``padding_mask``). Text is ``[bos] + tokens + [eos]`` padded with ``pad_id`` on the
right. ``mlm_labels`` / labels hold -100 (``masking.IGNORE_INDEX``) where no loss is taken.
"""

from .collate import IMAGE_FIELDS, Collate, normalize_images, pad_text, stack_images
from .decode import (
    DecodeCaption,
    DecodeImage,
    DecodeImageText,
    DecodeNLVR2,
    DecodeText,
    DecodeVQA,
    StreamRandom,
    encode_text,
    meta_member,
    text_member,
    vqa_soft_scores,
)
from .errors import SKIP_KINDS, SampleError, SkipCounter, classify_error
from .pipelines import (
    EpochLoader,
    Pipeline,
    SeededShuffle,
    WeightedMix,
    batch_stages,
    caption_pipeline,
    epoch_batches,
    image_pipeline,
    image_text_pipeline,
    language_probs,
    limit_per_reader,
    make_loader,
    nlvr2_pipeline,
    reader_stages,
    text_pipeline,
    vqa_pipeline,
)
from .shardlists import (
    RANK_VARIABLES,
    EpochShardList,
    EvalNodeSplit,
    SeededResampledShards,
    Urls,
    expand_urls,
    is_rank_zero,
    manifest_total,
    node_info,
    split_by_node,
    split_by_worker,
    stream_seed,
    worker_info,
)
from .tars import tar_to_samples

__all__ = [
    "IMAGE_FIELDS", "Collate", "normalize_images", "pad_text", "stack_images",
    "DecodeCaption", "DecodeImage", "DecodeImageText", "DecodeNLVR2", "DecodeText", "DecodeVQA",
    "StreamRandom", "encode_text", "meta_member", "text_member", "vqa_soft_scores",
    "SKIP_KINDS", "SampleError", "SkipCounter", "classify_error",
    "EpochLoader", "Pipeline", "SeededShuffle", "WeightedMix", "batch_stages", "caption_pipeline",
    "epoch_batches", "image_pipeline", "image_text_pipeline", "language_probs", "limit_per_reader",
    "make_loader", "nlvr2_pipeline", "reader_stages", "text_pipeline", "vqa_pipeline",
    "RANK_VARIABLES", "EpochShardList", "EvalNodeSplit", "SeededResampledShards", "Urls", "expand_urls",
    "is_rank_zero", "manifest_total", "node_info", "split_by_node", "split_by_worker", "stream_seed",
    "worker_info", "tar_to_samples",
]
