"""HiRes-LLaVA: ViT (+ SliceRestore) -> sampler -> projector -> LLaMA.

    images --slicing--> crops [sum_i (1 + r_i*c_i), 3, S, S] + grids [(r_i, c_i)]
      -> vision_tower, all crops of the batch at once (thumbnails first, then slices)
      -> features without CLS [N, g, g, Dv] -> sampler [N, h, h, Dv] -> projector [N, h, h, Dl]
      -> layout per image: thumbnail tokens, newline, then per slice row its slices' tokens
         (each slice in raster order, slices left to right) and one newline
      -> spliced into the text embeddings at the single <image> token -> Llama

Ablations share this one code path (ModelConfig): use_slices=False (thumbnail only),
use_sra=False, compression in {"sms", "avg", "none"}, overlap, and mode="llava15"
(thumbnail only, all g*g tokens, no sampler, no newline). `slicing.num_image_tokens` is
the only place the image-token count is computed; `encode_images` checks it.

Choices that are ours: the newline embedding follows slice rows (not every token row, as
LLaVA-NeXT does); the optional crop embedding (`cfg.crop_embedding`: a learned vector per
crop place, thumbnail or slice row + slice column, added to that crop's tokens, plus one per
token place in the crop's h x h grid, so each visual token says where it lies); a 1x1 grid
still adds its one slice (see `slicing`); the loss is the mean over all answer tokens of the
batch (eos included); the projector is LLaVA-1.5's.

Parameter names follow HF LLaVA(-NeXT): `vision_tower`, `multi_modal_projector.linear_1/2`,
`image_newline`, `language_model`. Submodules that an ablation does not use are not built,
and ViT parts off the feature path are frozen, so every trainable parameter gets a gradient
(DistributedDataParallel needs no find_unused_parameters).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minihires import ops
from minihires.model import slicing
from minihires.model.config import ModelConfig
from minihires.model.inputs import IGNORE, prepare, uses_slices
from minihires.model.llama import Llama
from minihires.model.llama import generate as llama_generate
from minihires.model.sampler import build_sampler
from minihires.model.vit import VisionTransformer


class MultiModalProjector(nn.Module):
    """Linear, GELU, Linear: vision width -> LLM width (LLaVA-1.5's projector)."""

    def __init__(self, vision_dim: int, text_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class HiResLLaVA(nn.Module):

    # the learned image embeddings `init_image_embeddings` may create (no checkpoint has them)
    IMAGE_EMBEDDINGS = ("image_newline", "crop_embedding", "crop_grid_embedding")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        hires = cfg.mode == "hires"
        sra = cfg.sra if cfg.sra_runs else None
        self.vision_tower = VisionTransformer(cfg.vit, sra)
        Dv, Dl = cfg.vit.hidden_size, cfg.llama.hidden_size
        if hires and cfg.compression != "none":
            self.sampler = build_sampler(cfg.compression, Dv, cfg.sms)
        self.multi_modal_projector = MultiModalProjector(Dv, Dl)
        self.init_image_embeddings()
        self.language_model = Llama(cfg.llama)

    def init_image_embeddings(self) -> None:
        """(Re)create the learned image embeddings the config asks for ("hires" mode only):
        `image_newline` [Dl]; with cfg.crop_embedding, `crop_embedding` [1 + 2 * m, Dl], m = max_slices (more with overlap: `max_side`)
        (rows: thumbnail, slice row 0.., slice column 0..) and `crop_grid_embedding` [h, h, Dl]
        (a token's place in its crop's h x h grid, shared by all crops). No pretrained
        checkpoint holds them (`hf`)."""
        cfg, Dl = self.cfg, self.cfg.llama.hidden_size
        if cfg.mode != "hires":
            return
        self.image_newline = nn.Parameter(torch.randn(Dl) * Dl ** -0.5)
        if cfg.crop_embedding:
            m = self.max_side(cfg)
            self.crop_embedding = nn.Parameter(torch.randn(1 + 2 * m, Dl) * Dl ** -0.5)
            h = slicing.tokens_per_side(cfg)
            self.crop_grid_embedding = nn.Parameter(torch.randn(h, h, Dl) * Dl ** -0.5)

    # ------------------------------------------------------------------ vision side
    def num_image_tokens(self, grid: tuple[int, int]) -> int:
        return slicing.num_image_tokens(grid, self.cfg)

    def encode_images(self, pixel_values: torch.Tensor,
                      grids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Crops of B images (Batch.pixel_values layout) -> B sequences [n_i, Dl] in layout order."""
        cfg, slices_on = self.cfg, uses_slices(self.cfg)
        grids = [(int(r), int(c)) for r, c in grids]
        B = len(grids)
        n_crops = [1 + r * c if slices_on else 1 for r, c in grids]
        if pixel_values.dim() != 4 or pixel_values.shape[0] != sum(n_crops):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but grids {grids} "
                             f"need {sum(n_crops)} crops [N, 3, S, S]"
                             + ("" if slices_on else " (thumbnails only: slices are off)"))
        starts = torch.tensor([0] + n_crops[:-1]).cumsum(0)           # first crop of each image
        if slices_on:                                                 # thumbnails first, then slices
            is_thumb = torch.zeros(sum(n_crops), dtype=torch.bool)
            is_thumb[starts] = True
            order = torch.cat([starts, (~is_thumb).nonzero().squeeze(1)]).to(pixel_values.device)
            pixel_values = pixel_values[order]
        if cfg.whole_canvas:                                          # the control: nothing is cut
            x = self._whole_canvas_features(pixel_values, grids)        # (N, g, g, Dv)
            N, g, Dv = x.shape[0], x.shape[1], x.shape[-1]
        else:
            feats = self.vision_tower(pixel_values, grids if slices_on else None)  # (N, 1+g*g, Dv)
            N, T, Dv = feats.shape
            g = int(round((T - 1) ** 0.5))
            x = feats[:, 1:].reshape(N, g, g, Dv)                       # (N, g, g, Dv), CLS dropped
        if cfg.mode == "llava15":
            tokens = self.multi_modal_projector(x.reshape(N, g * g, Dv))  # (N, g*g, Dl)
            return list(tokens.unbind(0))
        if hasattr(self, "sampler"):
            x = self.sampler(x)                                         # (N, h, h, Dv)
        x = self.multi_modal_projector(x)                               # (N, h, h, Dl)
        h, Dl = x.shape[1], x.shape[-1]
        if hasattr(self, "crop_embedding"):                             # where: which crop, where in it
            x = x + self._crop_places(grids, slices_on).to(x.dtype)[:, None, None]
            x = x + self.crop_grid_embedding.to(x.dtype)                # (N, h, h, Dl) + (h, h, Dl)
        newline = self.image_newline.to(x.dtype).view(1, Dl)            # (1, Dl)
        thumbs, slices = x[:B].reshape(B, h * h, Dl), x[B:]             # (B, h*h, Dl), (Ns, h, h, Dl)
        out, s = [], 0
        for b, (r, c) in enumerate(grids):
            parts = [thumbs[b], newline]
            if slices_on:
                rows = slices[s:s + r * c].reshape(r, c * h * h, Dl)   # (r, c*h*h, Dl)
                rows = torch.cat([rows, newline.expand(r, 1, Dl)], 1)  # (r, c*h*h + 1, Dl)
                parts.append(rows.reshape(r * (c * h * h + 1), Dl))
                s += r * c
            seq = torch.cat(parts, dim=0)                               # (n_i, Dl)
            if seq.shape[0] != self.num_image_tokens((r, c)):
                raise RuntimeError(f"image {b} (grid {r}x{c}) was laid out as {seq.shape[0]} "
                                   f"tokens, but slicing.num_image_tokens says "
                                   f"{self.num_image_tokens((r, c))}")
            out.append(seq)
        return out

    def _whole_canvas_features(self, pixel_values: torch.Tensor,
                               grids: list[tuple[int, int]]) -> torch.Tensor:
        """Crops (B thumbnails, then the slices) -> features [N, g, g, Dv] as if each slice had
        been encoded alone, but from ONE ViT pass per image over its whole canvas of slices
        (`ModelConfig.whole_canvas`): the slices' pixels are stitched back into the canvas,
        encoded with interpolated position embeddings, and the canvas tokens are cut into
        the slices' g x g pieces (`ops.stitch` / `ops.split`)."""
        B, S = len(grids), pixel_values.shape[-1]
        thumbs = self.vision_tower(pixel_values[:B])[:, 1:]                # (B, g*g, Dv)
        g, Dv = int(round(thumbs.shape[1] ** 0.5)), thumbs.shape[-1]
        slices = pixel_values[B:].permute(0, 2, 3, 1)                       # (Ns, S, S, 3)
        packed = ops.stitch(slices, grids)                                  # (Ns*S*S, 3)
        canvases = ops.canvases(packed, grids, S, S)                        # [r*S, c*S, 3] each
        tokens: list = [None] * B
        for shape in dict.fromkeys(c.shape for c in canvases):              # one pass per size
            idx = [i for i, c in enumerate(canvases) if c.shape == shape]
            x = torch.stack([canvases[i] for i in idx]).permute(0, 3, 1, 2)  # (n, 3, r*S, c*S)
            f = self.vision_tower(x)[:, 1:]                                 # (n, r*g*c*g, Dv)
            for k, i in enumerate(idx):
                tokens[i] = f[k]
        pieces = ops.split(torch.cat(tokens), grids, g, g)                  # (Ns, g, g, Dv)
        return torch.cat([thumbs.reshape(B, g, g, Dv), pieces])             # (N, g, g, Dv)

    @staticmethod
    def max_side(cfg: ModelConfig) -> int:
        """The most rows (or columns) of slices an image can have: max_slices, or the windows
        that overlap lays over a canvas of max_slices slices (`slicing.slice_grid`)."""
        return slicing.slice_grid((cfg.max_slices, cfg.max_slices), cfg.overlap)[0]

    def _crop_places(self, grids: list[tuple[int, int]], slices_on: bool) -> torch.Tensor:
        """[N, Dl]: the crop embedding of every crop, in encode_images' order (thumbnails,
        then each image's slices in raster order): thumbnail row, or slice row + column."""
        E, m = self.crop_embedding, self.max_side(self.cfg)
        if any(r > m or c > m for r, c in grids):
            raise ValueError(f"grids {grids} have more than {m} rows or columns of slices "
                             f"(max_slices {self.cfg.max_slices}, overlap {self.cfg.overlap})")
        thumbs = E[0].expand(len(grids), -1)                            # (B, Dl)
        if not slices_on:
            return thumbs
        rows = [1 + k // c for r, c in grids for k in range(r * c)]
        cols = [1 + m + k % c for r, c in grids for k in range(r * c)]
        idx = torch.tensor([rows, cols], device=E.device)               # (2, Ns)
        return torch.cat([thumbs, E[idx[0]] + E[idx[1]]], 0)            # (B + Ns, Dl)

    # ------------------------------------------------------------------ splicing
    def build_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     image_embeds: list[torch.Tensor], image_token_id: int,
                     labels: torch.Tensor | None = None, padding_side: str = "right",
                     segment_ids: torch.Tensor | None = None):
        """Replace each row's single <image> token by that image's embeddings.

        input_ids [B, T] (any padding, real tokens where attention_mask == 1)
        -> inputs_embeds [B, L, Dl], attention_mask [B, L], labels [B, L] or None,
        rows re-padded on `padding_side` ("right" for training, "left" for generation),
        and, when segment_ids [B, T] is given, segment_ids [B, L] as a fifth result (the image
        tokens in the <image> token's segment, which must be the shared prefix, 0).
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        B, T = input_ids.shape
        dev = input_ids.device
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        real = mask.bool()
        is_img = (input_ids == image_token_id) & real                   # (B, T)
        count = is_img.sum(1)
        if len(image_embeds) != B:
            raise ValueError(f"got {len(image_embeds)} images for {B} text rows")
        n_img = torch.tensor([e.shape[0] for e in image_embeds], device=dev)  # (B,)
        # one <image> per row; a text-only row (no <image>) takes an empty image [0, Dl]
        bad = ((count > 1) | ((count == 0) & (n_img > 0))).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"input_ids must hold exactly one <image> token (id {image_token_id}) "
                             f"per row with an image; rows {bad} hold {count[bad].tolist()}")
        rank = real.long().cumsum(1) - 1                                # (B, T) index among real tokens
        p = (rank * is_img).sum(1)                                      # (B,) rank of <image>
        lengths = real.sum(1) - count + n_img                           # (B,) spliced lengths
        L = int(lengths.max())
        max_pos = self.cfg.llama.max_position_embeddings
        if L > max_pos:
            raise ValueError(f"the spliced sequence has {L} tokens (text + {int(n_img.max())} image "
                             f"tokens), more than llama.max_position_embeddings = {max_pos}")
        offset = (L - lengths) if padding_side == "left" else torch.zeros_like(lengths)  # (B,)
        # destination of each kept text token and of each image token, as flat indices into B*L
        keep = real & ~is_img
        after = (rank > p[:, None]) & (count[:, None] > 0)             # text after the <image>
        text_pos = rank + torch.where(after, n_img[:, None] - 1, 0) + offset[:, None]
        row = torch.arange(B, device=dev)[:, None].expand(B, T)
        text_dst = (row * L + text_pos)[keep]                           # (n_text,)
        img_row = torch.repeat_interleave(torch.arange(B, device=dev), n_img)  # (sum n_img,) image of each
        first = torch.repeat_interleave(n_img.cumsum(0) - n_img, n_img)        # its image's first index
        k = torch.arange(int(n_img.sum()), device=dev) - first                 # index within its image
        img_dst = img_row * L + (p + offset)[img_row] + k                     # (sum n_img,)

        # the <image> id may lie outside the embedding table (LLaVA's id 32000): never embed it
        text_embeds = self.language_model.embed(input_ids.masked_fill(is_img, 0))  # (B, T, Dl)
        Dl = text_embeds.shape[-1]
        embeds = text_embeds.new_zeros(B * L, Dl)
        embeds[text_dst] = text_embeds[keep]
        embeds[img_dst] = torch.cat(image_embeds, dim=0).to(embeds.dtype)
        new_mask = torch.zeros(B * L, dtype=mask.dtype, device=dev)
        new_mask[text_dst] = 1
        new_mask[img_dst] = 1
        new_labels = None
        if labels is not None:
            new_labels = torch.full((B * L,), IGNORE, dtype=torch.long, device=dev)
            new_labels[text_dst] = labels[keep]
            new_labels = new_labels.view(B, L)
        if segment_ids is None:
            return embeds.view(B, L, Dl), new_mask.view(B, L), new_labels
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids must be shaped like input_ids {(B, T)}, "
                             f"got {tuple(segment_ids.shape)}")
        if bool((segment_ids[is_img] != 0).any()):
            raise ValueError("the <image> token must lie in the shared prefix (segment 0)")
        new_seg = torch.zeros(B * L, dtype=torch.long, device=dev)     # image tokens: 0
        new_seg[text_dst] = segment_ids.to(dev)[keep].long()
        return embeds.view(B, L, Dl), new_mask.view(B, L), new_labels, new_seg.view(B, L)

    # ------------------------------------------------------------------ training / inference
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                grids: Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, image_token_id: int | None = None,
                segment_ids: torch.Tensor | None = None, reduction: str = "mean"):
        """-> (logits [B, L, V], loss or None). Loss: next-token cross-entropy on labels != -100,
        their mean, or with reduction="sum" their sum (the trainer divides by a global count).
        segment_ids [B, T]: questions packed after the image prompt (`Batch.segment_ids`).
        Text-only rows (no <image>) may be mixed in: `grids` then lists the image rows only."""
        image_token_id = self._image_id(image_token_id)
        images, unused = self._row_images(input_ids, attention_mask, pixel_values, grids,
                                          image_token_id)
        embeds, mask, labels, *seg = self.build_inputs(input_ids, attention_mask, images,
                                                       image_token_id, labels, "right",
                                                       segment_ids)
        logits, loss = self.language_loss(embeds, mask, labels, seg[0] if seg else None,
                                          reduction)
        if loss is not None and unused is not None:
            loss = loss + 0.0 * unused
        return logits, loss

    def language_loss(self, embeds: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor | None, segment_ids: torch.Tensor | None = None,
                      reduction: str = "mean"):
        """`build_inputs`' results -> (logits [B, L, V], loss or None): the LLM's pass and the
        next-token cross-entropy on labels != -100 (see `forward`)."""
        logits = self.language_model(embeds, attention_mask=None if bool(mask.all()) else mask,
                                     position_ids=None, cache=None,
                                     segment_ids=segment_ids)             # (B, L, V)
        if labels is None:
            return logits, None
        target = labels[:, 1:]                                          # (B, L-1)
        if not bool((target != IGNORE).any()):
            raise ValueError("labels has no answer tokens (all -100): nothing to learn")
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               target.reshape(-1), ignore_index=IGNORE, reduction=reduction)
        return logits, loss

    def _row_images(self, input_ids, attention_mask, pixel_values, grids, image_token_id):
        """(one image embedding per row, [0, Dl] for a text-only row; None, or a zero-weight
        term when the batch has no image: the vision side then still runs on a blank crop,
        so that every rank of a sharded (FSDP) or DDP run calls the same modules each step)."""
        B = input_ids.shape[0]
        if len(grids) == B:
            return self.encode_images(pixel_values, grids), None
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        has = ((input_ids == image_token_id) & mask.bool()).any(1).tolist()
        if len(grids) != sum(has):
            raise ValueError(f"got {len(grids)} images for {sum(has)} rows with an <image> "
                             f"token (of {B} rows)")
        unused = None
        if grids:
            feats = iter(self.encode_images(pixel_values, grids))
        else:                                  # text only: a blank crop, weighted zero
            S, n = self.cfg.vit.image_size, 2 if uses_slices(self.cfg) else 1
            blank = torch.zeros(n, 3, S, S, device=input_ids.device,
                                dtype=self.multi_modal_projector.linear_1.weight.dtype)
            unused = self.encode_images(blank, [(1, 1)])[0].float().sum()
            feats = iter(())
        Dl = self.cfg.llama.hidden_size
        empty = input_ids.new_zeros((0, Dl), dtype=torch.float32)
        return [next(feats) if h else empty for h in has], unused

    def _image_id(self, image_token_id: int | None) -> int:
        if image_token_id is None:
            image_token_id = self.cfg.image_token_index
        if image_token_id is None:
            raise ValueError("the <image> token id is unknown: pass image_token_id= or set "
                             "cfg.image_token_index = tokenizer.image_id")
        return image_token_id

    @torch.no_grad()
    def generate(self, images, questions, tokenizer, max_new_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[str]:
        """Answer each question about its image (greedy when temperature == 0), with the KV cache.

        images/questions: lists of equal length, or one image and one question (a str).
        Prompts are left-padded; each answer is cut at eos and stripped.
        """
        if isinstance(questions, str):
            images, questions = [images], [questions]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        dev = next(self.parameters()).device
        batch = prepare(images, questions, tokenizer, self.cfg).to(dev)
        was_training = self.training
        self.eval()
        try:
            feats = self.encode_images(batch.pixel_values, batch.grids)
            embeds, mask, _ = self.build_inputs(batch.input_ids, batch.attention_mask, feats,
                                                tokenizer.image_id, None, "left")
            out = llama_generate(self.language_model, embeds, mask, max_new_tokens,
                                 tokenizer.eos_id, temperature=temperature, top_p=top_p,
                                 generator=generator, use_cache=True)  # (B, <= max_new_tokens)
        finally:
            self.train(was_training)
        answers = []
        for ids in out.tolist():
            if tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id)]
            # an LLM vocabulary padded beyond the tokenizer's has ids no text maps to: skip them
            answers.append(tokenizer.decode([i for i in ids if i < tokenizer.vocab_size]).strip())
        return answers
