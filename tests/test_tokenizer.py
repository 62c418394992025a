"""The sentencepiece tokenizer: training, round trips, the chat template, LLaMA-style models."""
import io
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from minihires.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, Tokenizer


def corpus(n=300, seed=0):
    rng = random.Random(seed)
    colors = ["red", "green", "blue", "yellow"]
    things = ["star", "circle", "square", "triangle", "cross", "heart", "moon", "arrow"]
    places = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom"]
    out = []
    for _ in range(n):
        c, t, p = rng.choice(colors), rng.choice(things), rng.choice(places)
        out += [f"What is at the {p}?", f"{c} {t}", f"Where is the {c} {t}?", p,
                f"How many {t}s are there?", rng.choice(["one", "two", "three", "3 of them"])]
    return out


@pytest.fixture(scope="module")
def small():  # the tiny preset's size: byte fallback off
    return Tokenizer.train(corpus(), 256)


@pytest.fixture(scope="module")
def big():  # byte fallback on: any text encodes
    return Tokenizer.train(corpus(), 600)


def test_special_ids_are_fixed_and_vocab_is_an_upper_bound(small, big):
    for tok in (small, big):
        assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.image_id) == (0, 1, 2, 3, 4)
        assert tok.sp.id_to_piece(tok.image_id) == IMAGE_TOKEN
    assert 100 < small.vocab_size <= 256
    assert big.vocab_size <= 600 and big.sp.piece_to_id("<0xC3>") != big.unk_id  # byte pieces


def test_round_trip_on_corpus_text(small, big):
    for tok in (small, big):
        for text in corpus(20, seed=1) + ["USER: <image>\nWhere is it? ASSISTANT: top left"]:
            ids = tok.encode(text)
            assert tok.unk_id not in ids
            assert tok.decode(ids) == text
    short = small.encode("What is at the top left?")
    assert len(short) < len("What is at the top left?") / 2  # merges learnt, not characters


@settings(max_examples=25, deadline=None)
@given(text=st.text(max_size=40).filter(lambda t: IMAGE_TOKEN not in t))
def test_byte_fallback_round_trips_any_text(big, text):
    ids = big.encode(text)
    assert big.unk_id not in ids
    assert big.decode(ids) == text


def test_small_vocab_maps_unseen_characters_to_unk(small):
    assert small.unk_id in small.encode("été")  # no byte fallback below 512 ids (documented)


def test_training_is_deterministic():
    a = Tokenizer.train(corpus(), 256).model_proto
    b = Tokenizer.train(iter(corpus()), 256).model_proto  # a generator works too
    c = Tokenizer.train(corpus(seed=5)[:400], 256).model_proto
    assert a == b and a != c


def test_decode_skips_bos_eos_pad_and_keeps_image(small):
    ids = small.encode("red star", bos=True, eos=True)
    assert ids[0] == small.bos_id and ids[-1] == small.eos_id
    assert small.decode(ids + [small.pad_id] * 3) == "red star"
    assert small.decode(small.encode(f"a {IMAGE_TOKEN} b")) == f"a {IMAGE_TOKEN} b"
    assert small.encode(f"a {IMAGE_TOKEN} b").count(small.image_id) == 1


def test_save_load_round_trip(small, tmp_path):
    small.save(tmp_path / "tok.model")
    again = Tokenizer.load(tmp_path / "tok.model")
    assert again.model_proto == small.model_proto
    assert again.chat("Where is the red star?", "top") == small.chat("Where is the red star?", "top")


@pytest.mark.parametrize("which", ["small", "big"])
def test_chat_template_masks_all_but_the_answer(which, request):
    tok = request.getfixturevalue(which)
    q, a = "What is at the top left?", "red star"
    prompt, prompt_labels = tok.chat(q)
    ids, labels = tok.chat(q, a)
    n = len(prompt)
    assert ids[:n] == prompt  # generation's prompt is the training prefix
    assert prompt_labels == [IGNORE_INDEX] * n
    assert labels[:n] == [IGNORE_INDEX] * n and labels[n:] == ids[n:]
    assert labels[-1] == tok.eos_id and tok.decode(labels[n:]) == a
    assert ids[0] == tok.bos_id and ids.count(tok.image_id) == 1 and ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == f"USER: {IMAGE_TOKEN}\n{q} ASSISTANT: {a}"
    # the answer encoded alone is what it is inside the whole text
    assert ids == tok.encode(f"USER: {IMAGE_TOKEN}\n{q} ASSISTANT: {a}", bos=True, eos=True)


def test_conversation_labels_every_answer_and_nothing_else(small):
    turns = [("What is at the top left?", "red star"), ("Where is the blue moon?", "top"),
             ("How many stars?", "two")]
    assert small.conversation(turns[:1]) == small.chat(*turns[0])
    ids, labels = small.conversation(turns)
    assert len(ids) == len(labels) and ids[:len(small.chat(*turns[0])[0])] == small.chat(*turns[0])[0]
    assert ids.count(small.image_id) == 1 and ids.count(small.bos_id) == 1
    assert ids.count(small.eos_id) == 3 and ids[-1] == small.eos_id
    # each later turn is encoded alone: its dummy-prefix space shows after the eos
    assert small.decode(ids) == (f"USER: {IMAGE_TOKEN}\nWhat is at the top left? ASSISTANT: red star"
                                 " USER: Where is the blue moon? ASSISTANT: top"
                                 " USER: How many stars? ASSISTANT: two")
    # labelled spans = the answers (and their eos), in order
    spans, cur = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert l == i
            cur.append(i)
    spans.append(cur)
    assert [small.decode(sp) for sp in spans] == ["red star", "top", "two"]
    assert all(sp[-1] == small.eos_id for sp in spans)


def test_questions_share_the_image_prompt_and_nothing_else(small):
    turns = [("What is at the top left?", "red star"), ("Where is the blue moon?", "top"),
             ("How many stars?", "two")]
    ids1, labels1 = small.chat(*turns[0])
    assert small.questions(turns[:1]) == (ids1, labels1, [0] * 5 + [1] * (len(ids1) - 5))
    ids, labels, segments = small.questions(turns)
    start = ids.index(small.image_id) + 1                  # <s> USER : _ <image>
    assert start == 5 and segments[:start] == [0] * start
    assert len(ids) == len(labels) == len(segments) and segments == sorted(segments)
    assert ids.count(small.image_id) == 1 and ids.count(small.bos_id) == 1
    for k, (q, a) in enumerate(turns, 1):
        own = [i for i, sg in enumerate(segments) if sg == k]
        chat_ids, chat_labels = small.chat(q, a)
        # question k's tokens are exactly what chat(q, a) has after the image prompt
        assert [ids[i] for i in own] == chat_ids[start:]
        assert [labels[i] for i in own] == chat_labels[start:]
    with pytest.raises(ValueError, match="at least one"):
        small.questions([])
    with pytest.raises(TypeError, match="turn 1 must be a"):
        small.questions([("q?", "a"), ("q?",)])


def test_conversation_rejects_bad_turns(small):
    with pytest.raises(ValueError, match="at least one"):
        small.conversation([])
    with pytest.raises(TypeError, match="turn 1 must be a"):
        small.conversation([("q?", "a"), ("q?",)])
    with pytest.raises(TypeError, match=r"answer \(turn 1\) must be str"):
        small.conversation([("q?", "a"), ("q?", None)])
    with pytest.raises(ValueError, match=r"question \(turn 2\) must not contain"):
        small.conversation([("q?", "a"), ("r?", "b"), (f"{IMAGE_TOKEN}?", "c")])


def test_chat_rejects_a_second_image(small):
    with pytest.raises(ValueError, match="question must not contain"):
        small.chat(f"What is in {IMAGE_TOKEN}?")
    with pytest.raises(ValueError, match="answer must not contain"):
        small.chat("What?", IMAGE_TOKEN)


def llama_style_model() -> bytes:
    """A tiny model trained like LLaMA's tokenizer.model: BPE, byte fallback, identity
    normalisation, unk/bos/eos = 0/1/2, no pad piece and no <image> piece."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus() + ["USER: ASSISTANT:"] * 5), model_writer=out,
        vocab_size=320, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2)
    return out.getvalue()


def test_loads_a_llama_style_model_without_image_piece(tmp_path):
    raw = llama_style_model()
    sp = spm.SentencePieceProcessor(model_proto=raw)
    assert sp.id_to_piece(sp.piece_to_id(IMAGE_TOKEN)) != IMAGE_TOKEN and sp.pad_id() == -1
    (tmp_path / "tokenizer.model").write_bytes(raw)
    tok = Tokenizer.load(tmp_path / "tokenizer.model")
    n = sp.get_piece_size()
    assert tok.image_id == n and tok.vocab_size == n + 1  # appended, as LLaVA's id 32000
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)  # pad = unk
    text = "Where is the red star?"
    assert tok.encode(text) == sp.encode(text)  # the original pieces keep their ids
    ids, labels = tok.chat("Where is the blue moon?", "top left")
    assert ids.count(tok.image_id) == 1 and ids[:len(tok.chat("Where is the blue moon?")[0])] \
        == tok.chat("Where is the blue moon?")[0]
    answer = [t for t in labels if t != IGNORE_INDEX]
    assert answer[-1] == tok.eos_id and tok.decode(answer) == "top left"
    assert tok.decode(ids) == f"USER: {IMAGE_TOKEN}\nWhere is the blue moon? ASSISTANT: top left"
    tok.save(tmp_path / "with_image.model")  # saved with the piece: reloads to the same ids
    again = Tokenizer.load(tmp_path / "with_image.model")
    assert again.model_proto == tok.model_proto and again.image_id == n


def test_bad_input_is_rejected(small):
    with pytest.raises(TypeError, match="iterable of strings"):
        Tokenizer.train("just one string", 256)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        Tokenizer.train(["ok", 3], 256)
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(corpus(), 4)
    with pytest.raises(ValueError, match="byte_fallback=True"):
        Tokenizer.train(corpus(), 256, byte_fallback=True)  # 256 byte pieces cannot fit
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer(b"not a model")
    with pytest.raises(ValueError, match="ids must lie"):
        small.decode([small.vocab_size])
    with pytest.raises(TypeError, match="text must be str"):
        small.encode(b"bytes")
