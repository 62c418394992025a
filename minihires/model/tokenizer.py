"""A sentencepiece tokenizer with the <image> placeholder and the chat template.

Two ways to get one:
- `Tokenizer.train(texts, vocab_size)` trains a LLaMA-style BPE model in-process
  (identity normalisation, whitespace kept, digits split) with fixed special ids
  unk=0, bos=1, eos=2, pad=3 and <image>=4 as a user-defined symbol. Same texts and
  arguments -> byte-identical model.
- `Tokenizer.load(path)` reads a .model file: ours, or a real LLaMA `tokenizer.model`.
  A model without an <image> piece gets one appended as a user-defined symbol, with id =
  its piece count (as LLaVA does: id 32000 for LLaMA's 32000 pieces); a model without a pad
  piece (LLaMA's) pads with its unk id, as LLaVA v1 does. The image id never reaches the
  embedding table: `minihires.model` replaces it with image features.

The chat template (LLaVA-1.5's, one line): "USER: <image>\\n{question} ASSISTANT: {answer}</s>".
`chat(q)` is the generation prompt; `chat(q, a)` extends exactly those ids with the answer's,
so training and generation see the same prompt tokens. `conversation([(q1, a1), (q2, a2), ...])`
is a multi-turn training text about one image, LLaVA-1.5's "...{a1}</s>USER: {q2} ASSISTANT:
{a2}</s>..." (each later turn encoded on its own, so its first piece carries sentencepiece's
dummy-prefix space; ours). `questions([...])`, the training default, packs the same pairs so
that each question sees the image prompt but not the other questions
(`minihires.model.shared_prefix`).
"""
from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterable, Sequence

import sentencepiece as spm

IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100  # label of tokens the loss skips (F.cross_entropy's default ignore_index)

# Below this vocabulary size `train` turns byte fallback off by default: the 256 byte pieces
# would crowd out the real vocabulary (at 256, sentencepiece cannot fit them at all). Without
# byte fallback, a character never seen in training encodes as unk. Our choice.
MIN_BYTE_FALLBACK_VOCAB = 512

_PROMPT = "USER: " + IMAGE_TOKEN + "\n{question} ASSISTANT:"
_TURN = "USER: {question} ASSISTANT:"         # a later turn of a conversation: no image


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _append_user_defined_piece(model_proto: bytes, piece: str) -> bytes:
    """Append `piece` as a USER_DEFINED piece to a serialized sentencepiece ModelProto.

    Hand-written protobuf so that no protobuf dependency is needed: ModelProto field 1 is
    `repeated SentencePiece pieces`, and a repeated field may reappear at the end of the
    message, where parsers append it. SentencePiece = {1: piece (string), 2: score (float),
    3: type (enum, USER_DEFINED = 4)}.
    """
    text = piece.encode("utf-8")
    entry = (b"\x0a" + _varint(len(text)) + text      # field 1, length-delimited: piece
             + b"\x15" + struct.pack("<f", 0.0)        # field 2, 32-bit: score
             + b"\x18" + _varint(4))                   # field 3, varint: type USER_DEFINED
    return model_proto + b"\x0a" + _varint(len(entry)) + entry


class Tokenizer:
    """sentencepiece + fixed special ids + the <image> placeholder + the chat template."""

    image_token = IMAGE_TOKEN

    def __init__(self, model_proto: bytes):
        if not isinstance(model_proto, (bytes, bytearray)):
            raise TypeError(f"model_proto must be bytes, got {type(model_proto).__name__}")
        sp = self._processor(bytes(model_proto))
        if sp.id_to_piece(sp.piece_to_id(IMAGE_TOKEN)) != IMAGE_TOKEN:  # absent: LLaMA's model
            model_proto = _append_user_defined_piece(bytes(model_proto), IMAGE_TOKEN)
            sp = self._processor(model_proto)
        self.model_proto = bytes(model_proto)
        self.sp = sp
        self.image_id = sp.piece_to_id(IMAGE_TOKEN)
        if self.sp.encode(IMAGE_TOKEN).count(self.image_id) != 1:
            raise ValueError(f"the model's {IMAGE_TOKEN!r} piece is not a user-defined symbol: "
                             "it does not encode as one token")
        self.unk_id, self.bos_id, self.eos_id = sp.unk_id(), sp.bos_id(), sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"the sentencepiece model needs bos and eos pieces, got "
                             f"bos_id={self.bos_id}, eos_id={self.eos_id}")
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.unk_id

    @staticmethod
    def _processor(model_proto: bytes) -> spm.SentencePieceProcessor:
        try:
            return spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise ValueError(f"not a valid sentencepiece model: {e}") from None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *,
              byte_fallback: bool | None = None, span_words: bool = False) -> "Tokenizer":
        """Train a BPE model on `texts` (an iterable of str, one sentence each).

        vocab_size is an upper bound (hard_vocab_limit=False): a small corpus may yield fewer
        pieces, never more, so `vocab_size` of the LLM can be set to the requested value.
        byte_fallback (default: on iff vocab_size >= MIN_BYTE_FALLBACK_VOCAB) makes any text
        encodable through byte pieces. span_words lets a piece cross a space (sentencepiece's
        split_by_whitespace=False): on a small closed corpus such as EntityGrid-QA's, whole
        phrases ("▁top▁left", "▁red▁stripes") become pieces. The chat template's text is added
        to the corpus so its characters and pieces always exist. Deterministic: one thread, no
        sampling.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not one string")
        if not isinstance(vocab_size, int) or vocab_size < 8:
            raise ValueError(f"vocab_size must be an int >= 8, got {vocab_size!r}")
        if byte_fallback is None:
            byte_fallback = vocab_size >= MIN_BYTE_FALLBACK_VOCAB

        bad_item: list[TypeError] = []  # raised after training: sentencepiece would wrap it

        def sentences():
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    bad_item.append(TypeError(f"texts[{i}] must be str, got {type(text).__name__}"))
                    return
                yield text
            for _ in range(4):  # the template, so its pieces exist whatever the corpus
                yield _PROMPT.format(question="?") + " ."

        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=out, vocab_size=vocab_size,
                model_type="bpe", hard_vocab_limit=False, byte_fallback=byte_fallback,
                character_coverage=1.0, required_chars="\n",
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, user_defined_symbols=[IMAGE_TOKEN],
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                split_digits=True, split_by_whitespace=not span_words, num_threads=1,
                minloglevel=2)
        except RuntimeError as e:
            if bad_item:
                raise bad_item[0] from None
            raise ValueError(f"sentencepiece training failed for vocab_size={vocab_size}, "
                             f"byte_fallback={byte_fallback}: {e}") from None
        if bad_item:
            raise bad_item[0]
        return cls(out.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        with open(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str | os.PathLike) -> None:
        """Write the .model file (with <image> included, so `load` gives the same ids)."""
        with open(path, "wb") as f:
            f.write(self.model_proto)

    # ---- ids <-> text ---------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, image={self.image_id})")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids; "<image>" in the text becomes image_id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, skipping bos, eos and pad; image_id is written as "<image>"."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {bad[:5]}")
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self.sp.decode([i for i in ids if i not in special])

    def pieces(self, text: str) -> list[str]:
        """The pieces `encode` would produce, as strings (for reading tokenizations)."""
        return [self.sp.id_to_piece(i) for i in self.encode(text)]

    # ---- the chat template ----------------------------------------------------------------

    def chat(self, question: str, answer: str | None = None) -> tuple[list[int], list[int]]:
        """(ids, labels) of "USER: <image>\\n{question} ASSISTANT:" with bos, then, when an
        answer is given, " {answer}</s>". labels are IGNORE_INDEX except the answer and eos
        (labels[t] is the target of position t; the shift happens in the loss)."""
        _check_turn(question, answer, 0, answer_required=False)
        ids = self.encode(_PROMPT.format(question=question), bos=True)
        labels = [IGNORE_INDEX] * len(ids)
        if answer is not None:
            # encoded alone: the dummy-prefix space stands for the space after "ASSISTANT:",
            # and the prompt's ids stay a prefix of the training ids
            target = self.encode(answer, eos=True)
            ids, labels = ids + target, labels + target
        return ids, labels

    def conversation(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
        """(ids, labels) of several questions and answers about one image: turn 0 is
        `chat(q, a)`, each later turn appends "USER: {q} ASSISTANT:" (unlabelled) and
        " {a}</s>" (labelled). One turn gives exactly `chat(q, a)`."""
        turns = _check_turns(turns)
        ids, labels = self.chat(*turns[0])
        for question, answer in turns[1:]:
            prompt = self.encode(_TURN.format(question=question))
            target = self.encode(answer, eos=True)
            ids = ids + prompt + target
            labels = labels + [IGNORE_INDEX] * len(prompt) + target
        return ids, labels

    def questions(self, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, segments) of several questions about one image that share its prompt
        but not each other (`minihires.model.shared_prefix`): `chat(q1, a1)`, then for each later
        turn the ids `chat(q, a)` has after its <image> token. segments is 0 up to and
        including <image>, k for turn k's tokens. One turn gives exactly `chat(q, a)`."""
        turns = _check_turns(turns)
        ids, labels = self.chat(*turns[0])
        start = ids.index(self.image_id) + 1                       # the shared prefix's length
        segments = [0] * start + [1] * (len(ids) - start)
        for k, (question, answer) in enumerate(turns[1:], 2):
            turn_ids, turn_labels = self.chat(question, answer)
            if turn_ids[:start] != ids[:start]:                    # cannot happen: <image> splits
                raise AssertionError("the chat prompt's prefix changed with the question")
            ids, labels = ids + turn_ids[start:], labels + turn_labels[start:]
            segments += [k] * (len(turn_ids) - start)
        return ids, labels, segments


def _check_turns(turns) -> list:
    """A non-empty list of (question, answer) pairs, each checked by `_check_turn`."""
    turns = list(turns)
    if not turns:
        raise ValueError("a conversation needs at least one (question, answer) turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, (tuple, list)) or len(turn) != 2:
            raise TypeError(f"turn {i} must be a (question, answer) pair, got {turn!r}")
        _check_turn(*turn, i, answer_required=True)
    return turns


def _check_turn(question, answer, i: int, answer_required: bool) -> None:
    """Questions and answers are strings without "<image>" (the template holds the only one)."""
    where = f" (turn {i})" if i else ""
    for name, text in (("question", question), ("answer", answer)):
        if text is None and name == "answer" and not answer_required:
            continue
        if not isinstance(text, str):
            raise TypeError(f"{name}{where} must be str, got {type(text).__name__}")
        if IMAGE_TOKEN in text:
            raise ValueError(f"{name}{where} must not contain {IMAGE_TOKEN!r}: the template has "
                             f"the only one; got {text!r}")
