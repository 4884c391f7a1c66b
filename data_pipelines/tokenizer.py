"""SentencePiece tokenizer: training on plain-text files and a small wrapper with a fixed id layout.

Every mmmoe tokenizer has the same special ids, which the models and the masking code rely on:

====  =========  ==================================================
id    piece      role
====  =========  ==================================================
0     ``<pad>``  padding (control piece, decodes to nothing)
1     ``<unk>``  unknown
2     ``<s>``    beginning of sequence (control)
3     ``</s>``   end of sequence (control)
4     ``<mask>`` masked-language-modelling mask (user-defined symbol)
====  =========  ==================================================

Being a user-defined symbol, the literal text ``<mask>`` in an input is encoded as id 4.
:class:`Tokenizer` refuses a model whose layout differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>", MASK_ID: "<mask>"}
MODEL_TYPES = ("unigram", "bpe")


def _text_files(paths: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: List[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(str(q) for q in p.glob("*.txt") if q.is_file())
            if not found:
                raise ValueError(f"no .txt files in folder {p}")
            files.extend(found)
        elif p.is_file():
            files.append(str(p))
        else:
            raise FileNotFoundError(f"tokenizer training file not found: {p}")
    if not files:
        raise ValueError("no training text files given")
    return files


def train_tokenizer(
    text_files: Union[PathLike, Sequence[PathLike]],
    model_prefix: PathLike,
    vocab_size: int = 64000,
    model_type: str = "unigram",
    *,
    character_coverage: float = 1.0,
    input_sentence_size: int = 1_000_000,
    byte_fallback: bool = False,
    hard_vocab_limit: bool = False,
    num_threads: int = 2,
    seed_sentencepiece_size: int = 1_000_000,
    normalization_rule_name: str = "nmt_nfkc",
    verbose: bool = False,
) -> Path:
    """Train a SentencePiece model on plain-text files (one sentence per line); return the .model.

    Writes ``<model_prefix>.model`` and ``<model_prefix>.vocab`` with the fixed special-id layout
    of this module. ``text_files``: files and/or folders (a folder = every ``*.txt`` inside).

    ``hard_vocab_limit=False`` (the default) lets a corpus too small for ``vocab_size`` end up with
    a smaller vocabulary instead of failing. ``input_sentence_size`` caps (by random sampling) how
    many sentences are loaded. ``character_coverage=1.0`` keeps every character seen; for corpora
    with large alphabets (CJK) 0.9995 is usual. ``byte_fallback=True`` encodes unseen characters
    as UTF-8 bytes instead of ``<unk>`` (adds 256 pieces, so it needs ``vocab_size`` > ~300).
    Training runs offline; SentencePiece errors are raised as :class:`ValueError`.
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size <= len(SPECIAL_PIECES):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_PIECES)}, got {vocab_size}")
    files = _text_files(text_files)
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=files,
            model_prefix=str(prefix),
            vocab_size=int(vocab_size),
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece=SPECIAL_PIECES[PAD_ID],
            unk_piece=SPECIAL_PIECES[UNK_ID],
            bos_piece=SPECIAL_PIECES[BOS_ID],
            eos_piece=SPECIAL_PIECES[EOS_ID],
            user_defined_symbols=[SPECIAL_PIECES[MASK_ID]],
            character_coverage=float(character_coverage),
            input_sentence_size=int(input_sentence_size),
            shuffle_input_sentence=True,
            seed_sentencepiece_size=int(seed_sentencepiece_size),
            byte_fallback=bool(byte_fallback),
            hard_vocab_limit=bool(hard_vocab_limit),
            num_threads=int(num_threads),
            normalization_rule_name=normalization_rule_name,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for {prefix}: {e}") from None
    model = prefix.with_name(prefix.name + ".model")
    Tokenizer(model)  # checks the layout
    return model


class Tokenizer:
    """A SentencePiece model with the fixed special-id layout (see the module docstring).

    Picklable (the model travels as its serialized bytes), so it can go to DataLoader workers.
    """

    def __init__(self, model_file: PathLike) -> None:
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self._load(path.read_bytes())

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as e:
            raise ValueError(f"{self.path} is not a SentencePiece model file ({e})") from None
        if sp.GetPieceSize() == 0:
            raise ValueError(f"{self.path} is not a SentencePiece model file (no pieces)")
        self._sp = sp
        self._check_layout()

    def _check_layout(self) -> None:
        sp = self._sp
        got = {
            "pad_id": sp.pad_id(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "mask_id": sp.piece_to_id(SPECIAL_PIECES[MASK_ID]),
        }
        want = {"pad_id": PAD_ID, "unk_id": UNK_ID, "bos_id": BOS_ID, "eos_id": EOS_ID,
                "mask_id": MASK_ID}
        bad = {k: v for k, v in got.items() if v != want[k]}
        if sp.GetPieceSize() > MASK_ID and bad == {}:
            if sp.id_to_piece(MASK_ID) != SPECIAL_PIECES[MASK_ID] or sp.IsControl(MASK_ID) \
                    or sp.IsUnknown(MASK_ID) or sp.IsUnused(MASK_ID):
                bad["mask_id"] = MASK_ID
        if bad:
            raise ValueError(
                f"{self.path}: special ids {got} differ from the mmmoe layout {want} "
                f"(pieces {list(SPECIAL_PIECES.values())}); train it with "
                "data_pipelines.tokenizer.train_tokenizer / 'mmmoe tokenizer train'"
            )

    # -- pickling (DataLoader workers) -------------------------------------------------------
    def __getstate__(self):
        return {"path": str(self.path), "proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state) -> None:
        self.path = Path(state["path"])
        self._load(state["proto"])

    # -- API ---------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Token ids of ``text`` (no special ids unless ``add_bos`` / ``add_eos``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        ids = list(self._sp.encode(text))
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_batch(self, texts: Iterable[str], add_bos: bool = False,
                     add_eos: bool = False) -> List[List[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad / bos / eos decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def mask_id(self) -> int:
        return MASK_ID

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


__all__ = [
    "BOS_ID", "EOS_ID", "MASK_ID", "MODEL_TYPES", "PAD_ID", "SPECIAL_PIECES", "Tokenizer",
    "UNK_ID", "train_tokenizer",
]
