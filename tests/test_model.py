"""HiResLLaVA: stages and layout over mixed grids, token counts per ablation, splicing,
padding, loss, generation, bad input, and a tiny model that overfits a few examples."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from minihires.model import IGNORE, HiResLLaVA, collate, image_inputs, prepare, slicing
from minihires.model.config import tiny
from minihires.model.tokenizer import Tokenizer

# image sizes whose grids under tiny() with max_slices=6 (S = 32) are 1x1, 1x3, 2x2, 3x2
SIZES = {(1, 1): (20, 20), (1, 3): (100, 30), (2, 2): (64, 64), (3, 2): (64, 96)}
QUESTIONS = ["What colour is the box?", "Where is the box?", "Is it big?", "What is at the top?"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    texts = QUESTIONS + ["red", "blue", "green", "yellow", "left", "right", "yes", "no"]
    return Tokenizer.train(texts * 3, 256)


def make_cfg(tok, **kw):
    cfg = tiny()
    cfg.max_slices = 6
    cfg.image_token_index = tok.image_id
    return dataclasses.replace(cfg, **kw)


def noise(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def mixed_images():
    return [noise(w, h, i) for i, (w, h) in enumerate(SIZES.values())]


def model_for(cfg, seed=0, active=True):
    torch.manual_seed(seed)
    m = HiResLLaVA(cfg).eval()
    if active:                       # zero-initialised adapter/sampler outputs made non-zero
        for name, p in m.named_parameters():
            if name.endswith(("sra.1.proj.weight", "sampler.o_proj.weight", "sampler.fc2.weight")):
                torch.nn.init.normal_(p, std=0.05)
    return m


def test_stage_shapes_mixed_grids(tok):
    cfg = make_cfg(tok)
    m = model_for(cfg)
    batch = prepare(mixed_images(), QUESTIONS, tok, cfg, answers=["red", "left", "yes", "no"])
    assert batch.grids == list(SIZES)
    n_crops = sum(1 + r * c for r, c in SIZES)                     # 2 + 4 + 5 + 7 = 18
    assert batch.pixel_values.shape == (n_crops, 3, 32, 32)
    seen = {}
    hooks = [getattr(m, name).register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, out.shape))
        for name in ("vision_tower", "sampler", "multi_modal_projector")]
    logits, loss = m(**batch.kwargs())
    for h in hooks:
        h.remove()
    assert seen["vision_tower"] == (n_crops, 1 + 8 * 8, 64)        # g = 8, CLS + 64 patches
    assert seen["sampler"] == (n_crops, 4, 4, 64)                  # window 2
    assert seen["multi_modal_projector"] == (n_crops, 4, 4, cfg.llama.hidden_size)  # LLM width
    text_len = batch.attention_mask.sum(1)
    L = max(int(t) - 1 + slicing.num_image_tokens(g, cfg) for t, g in zip(text_len, SIZES))
    assert logits.shape == (4, L, cfg.llama.vocab_size)
    assert torch.isfinite(loss)


ABLATIONS = {
    "hires-sms": {}, "avg": dict(compression="avg"), "none": dict(compression="none"),
    "no-sra": dict(use_sra=False), "thumbnail-only": dict(use_slices=False),
    "overlap": dict(overlap=0.25, use_sra=False), "llava15": dict(mode="llava15"),
    "no-crop-embedding": dict(crop_embedding=False),
}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_num_image_tokens_equals_spliced(tok, ablation):
    cfg = make_cfg(tok, **ABLATIONS[ablation])
    m = model_for(cfg)
    batch = prepare(mixed_images(), QUESTIONS, tok, cfg)
    with torch.no_grad():
        images = m.encode_images(batch.pixel_values, batch.grids)
        embeds, mask, _ = m.build_inputs(batch.input_ids, batch.attention_mask, images, tok.image_id)
    text_len = batch.attention_mask.sum(1)
    for b, grid in enumerate(batch.grids):
        n = slicing.num_image_tokens(grid, cfg)
        assert images[b].shape == (n, cfg.llama.hidden_size)
        assert int(mask[b].sum()) == int(text_len[b]) - 1 + n
    # every grid the cap allows, from random crops in one batch
    grids = [(r, c) for r in range(1, 7) for c in range(1, 7) if r * c <= cfg.max_slices]
    per_image = [1 + r * c if cfg.mode == "hires" and cfg.use_slices else 1 for r, c in grids]
    with torch.no_grad():
        out = m.encode_images(torch.randn(sum(per_image), 3, 32, 32), grids)
    assert [o.shape[0] for o in out] == [slicing.num_image_tokens(g, cfg) for g in grids]
    # every trainable parameter gets a gradient (DDP without find_unused_parameters)
    _, loss = m(**prepare(mixed_images(), QUESTIONS, tok, cfg, answers=["a", "b", "c", "d"]).kwargs())
    loss.backward()
    unused = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    if ablation == "llava15":
        assert not hasattr(m, "image_newline") and not hasattr(m, "sampler")
    if ablation in ("no-sra", "thumbnail-only", "llava15"):
        assert len(m.vision_tower.sra) == 0


def test_layout_matches_per_image_assembly(tok):
    """Batched encoding (mixed grids in one ViT batch) == each image alone, assembled by hand:
    thumbnail, newline, then per slice row its slices' tokens and a newline; every crop's
    tokens carry its crop embedding (thumbnail, or slice row + slice column) and each token
    the embedding of its place in the crop's grid."""
    cfg = make_cfg(tok)
    assert cfg.crop_embedding
    m = model_for(cfg)
    images = mixed_images()
    batch = prepare(images, QUESTIONS, tok, cfg)
    with torch.no_grad():
        got = m.encode_images(batch.pixel_values, batch.grids)
        for b, img in enumerate(images):
            crops, (r, c) = image_inputs(img, cfg)
            feats = m.vision_tower(crops, [(r, c)])[:, 1:].reshape(-1, 8, 8, 64)  # (1 + r*c, g, g, Dv)
            Dl, E, M = cfg.llama.hidden_size, m.crop_embedding, cfg.max_slices
            tok_ = m.multi_modal_projector(m.sampler(feats)).reshape(1 + r * c, 16, Dl)
            tok_ = tok_ + m.crop_grid_embedding.reshape(16, Dl)     # place in the 4 x 4 grid
            nl = m.image_newline[None]
            parts = [tok_[0] + E[0], nl]
            for i in range(r):
                parts += [tok_[1 + i * c + j] + E[1 + i] + E[1 + M + j] for j in range(c)] + [nl]
            torch.testing.assert_close(got[b], torch.cat(parts), atol=1e-5, rtol=1e-5)


def test_splice_places_tokens(tok):
    cfg = make_cfg(tok)
    m = model_for(cfg)
    batch = prepare(mixed_images(), QUESTIONS, tok, cfg, answers=["red", "left", "yes", "no"])
    with torch.no_grad():
        images = m.encode_images(batch.pixel_values, batch.grids)
        text = m.language_model.embed(batch.input_ids)
        for side in ("right", "left"):
            embeds, mask, labels = m.build_inputs(batch.input_ids, batch.attention_mask, images,
                                                  tok.image_id, batch.labels, side)
            for b in range(4):
                T = int(batch.attention_mask[b].sum())
                p = int((batch.input_ids[b] == tok.image_id).nonzero())
                n = images[b].shape[0]
                real = mask[b].nonzero().flatten()
                assert (real == torch.arange(real[0], real[0] + T - 1 + n)).all()  # contiguous
                assert (real[0] == 0) if side == "right" else (real[-1] == mask.shape[1] - 1)
                row, lab = embeds[b, real], labels[b, real]
                torch.testing.assert_close(row[:p], text[b, :p])
                torch.testing.assert_close(row[p:p + n], images[b])
                torch.testing.assert_close(row[p + n:], text[b, p + 1:T])
                assert (lab[p:p + n] == IGNORE).all()
                assert lab[p + n:].tolist() == batch.labels[b, p + 1:T].tolist()
                assert (labels[b, mask[b] == 0] == IGNORE).all()


def test_right_padding_and_answer_only_loss(tok):
    cfg = make_cfg(tok)
    m = model_for(cfg)
    images, answers = mixed_images(), ["red", "left", "yes", "no"]
    batch = prepare(images, QUESTIONS, tok, cfg, answers=answers)
    with torch.no_grad():
        logits, loss = m(**batch.kwargs())
        _, _, labels = m.build_inputs(batch.input_ids, batch.attention_mask,
                                      m.encode_images(batch.pixel_values, batch.grids),
                                      tok.image_id, batch.labels)
        # loss = cross-entropy of the next token, on answer tokens (and eos) only
        manual = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 labels[:, 1:].reshape(-1), ignore_index=IGNORE)
        torch.testing.assert_close(loss, manual)
        n_answer = sum(len(tok.encode(a)) + 1 for a in answers)
        assert int((labels != IGNORE).sum()) == n_answer
        # each row's logits are those of the row alone: right padding changes nothing
        for b in range(4):
            one = prepare(images[b:b + 1], QUESTIONS[b:b + 1], tok, cfg, answers=answers[b:b + 1])
            alone, _ = m(**one.kwargs())
            torch.testing.assert_close(logits[b, :alone.shape[1]], alone[0], atol=1e-4, rtol=1e-4)


def test_generate_left_padding_is_invisible(tok):
    """The prompt's last-position logits (what the first generated token comes from) are the
    same for a row in a left-padded batch as for the row alone."""
    cfg = make_cfg(tok)
    m = model_for(cfg, seed=3)
    images = mixed_images()

    def last_logits(imgs, qs):
        b = prepare(imgs, qs, tok, cfg)
        with torch.no_grad():
            embeds, mask, _ = m.build_inputs(b.input_ids, b.attention_mask,
                                             m.encode_images(b.pixel_values, b.grids),
                                             tok.image_id, padding_side="left")
            return m.language_model(embeds, mask)[:, -1]       # (B, V)

    together = last_logits(images, QUESTIONS)
    for b in range(4):
        alone = last_logits(images[b:b + 1], QUESTIONS[b:b + 1])
        torch.testing.assert_close(together[b], alone[0], atol=1e-4, rtol=1e-4)
    answers = m.generate(images, QUESTIONS, tok, max_new_tokens=6)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    sample = lambda seed: m.generate(images, QUESTIONS, tok, max_new_tokens=6,  # noqa: E731
                                     temperature=1.0, top_p=0.9,
                                     generator=torch.Generator().manual_seed(seed))
    first = sample(0)
    torch.manual_seed(123)                                      # the global RNG plays no part:
    assert sample(0) == first                                   # the generator's seed decides
    assert sample(1) != first                                   # (and does decide)


def test_bad_input(tok):
    cfg = make_cfg(tok)
    m = model_for(cfg)
    img = mixed_images()[0]
    crops, grid = image_inputs(img, cfg)
    for text in ["USER: hello ASSISTANT:", "USER: <image><image> hi ASSISTANT:"]:
        b = collate([(crops, grid, tok.encode(text, bos=True), None)], tok.pad_id)
        with pytest.raises(ValueError, match="exactly one <image>"):
            m(**b.kwargs())
    short = make_cfg(tok)
    short.llama.max_position_embeddings = 64                 # a 2x2 grid alone needs 83 tokens
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m2 = model_for(short)
        m2(**prepare([noise(64, 64, 0)], ["Is it big?"], tok, short, answers=["yes"]).kwargs())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m.generate(img, "Is it big?", tok, max_new_tokens=600)
    b = prepare([img], ["Is it big?"], tok, cfg)
    with pytest.raises(ValueError, match="pixel_values"):
        m(b.input_ids, b.pixel_values[:1], b.grids, b.attention_mask)
    with pytest.raises(ValueError, match="image_token_index"):
        model_for(make_cfg(tok, image_token_index=None))(**b.kwargs())
    with pytest.raises(ValueError, match="equally many"):
        prepare([img, img], ["Is it big?"], tok, cfg)
    with pytest.raises(ValueError, match="width and height"):
        prepare([Image.new("RGB", (0, 4))], ["Is it big?"], tok, cfg)
    for bad, match in [(dict(mode="uhd"), "mode"), (dict(compression="max"), "compression"),
                       (dict(overlap=1.5), "overlap"), (dict(max_slices=0), "max_slices")]:
        with pytest.raises(ValueError, match=match):
            HiResLLaVA(make_cfg(tok, **bad))
    odd = make_cfg(tok)
    odd.sms.window = 3                                        # does not divide g = 8
    with pytest.raises(ValueError, match="window"):
        HiResLLaVA(odd)
    with pytest.raises(ValueError, match="labels has no answer"):
        b = prepare([img], ["Is it big?"], tok, cfg)
        m(**dataclasses.replace(b, labels=torch.full_like(b.input_ids, IGNORE)).kwargs())


def box_image(w, h, colour, side):
    im = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0 if side == "left" else w - w // 3
    ImageDraw.Draw(im).rectangle([x, 0, x + w // 3, h // 2], fill=colour)
    return im


def test_tiny_model_overfits(tok):
    """8 image-question-answer examples (4 images over 4 grids x 2 questions) are learnt in
    at most 150 AdamW steps and then answered by generate."""
    data = [((40, 40), (255, 0, 0), "red", "left"), ((100, 30), (0, 0, 255), "blue", "right"),
            ((64, 64), (0, 160, 0), "green", "right"), ((64, 96), (255, 200, 0), "yellow", "left")]
    images, questions, answers = [], [], []
    for size, rgb, colour, side in data:
        im = box_image(*size, rgb, side)
        images += [im, im]
        questions += ["What colour is the box?", "Where is the box?"]
        answers += [colour, side]
    cfg = make_cfg(tok)
    torch.manual_seed(0)
    m = HiResLLaVA(cfg)
    batch = prepare(images, questions, tok, cfg, answers=answers)
    assert len(set(batch.grids)) == 4
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for step in range(150):
        _, loss = m(**batch.kwargs())
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss {first:.2f} -> {loss.item():.3f} after {step + 1} steps"
    # batched (left-padded, KV cache) generation recovers every answer, as does each row alone
    assert m.generate(images, questions, tok, max_new_tokens=4) == answers
    assert [m.generate(images[i], questions[i], tok, max_new_tokens=4)[0] for i in (1, 6)] \
        == [answers[1], answers[6]]


def test_image_id_outside_the_vocabulary(tok):
    """LLaVA's <image> id equals LLaMA's vocabulary size (32000): splicing never embeds it."""
    cfg = make_cfg(tok)
    m = model_for(cfg)
    b = prepare(mixed_images()[:2], QUESTIONS[:2], tok, cfg)
    big = cfg.llama.vocab_size
    ids = b.input_ids.masked_fill(b.input_ids == tok.image_id, big)
    with torch.no_grad():
        images = m.encode_images(b.pixel_values, b.grids)
        a = m.build_inputs(b.input_ids, b.attention_mask, images, tok.image_id)[0]
        c = m.build_inputs(ids, b.attention_mask, images, big)[0]
    assert torch.equal(a, c)
