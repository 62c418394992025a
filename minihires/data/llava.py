"""LLaVA-format conversation data: a streaming reader, the training examples, the batches.

The format (LLaVA-1.5's `llava_v1_5_mix665k.json`, `blip_laion_cc_sbu_558k.json`):

    [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."},
                        {"from": "human", "value": "What feature can be seen on the back?"},
                        {"from": "gpt", "value": "An advertisement."}]},
     {"id": "text-1", "conversations": [...]}]                # text-only: no "image" key

    rows(path)            the rows one at a time (an incremental parse of the JSON array:
                          one row in memory, never the file)
    check_row(row, i)     -> (image or None, [(question, answer), ...]); ValueError naming
                          the row (index and id) and the field when a row is malformed
    encode(tokenizer, image?, turns)  -> (ids, labels): the `llava15` chat template
                          "USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>",
                          labels on the assistant turns (answers and their </s>) only
    LlavaStream           an IterableDataset of micro-batches for DataLoader workers, sharded
                          by rank (row i -> rank i mod world) and by worker (micro-batch k ->
                          worker k mod workers), so the loader yields the same batches, in the
                          same order, for any number of workers
    export_entitygrid     EntityGrid-QA samples -> images + a LLaVA-format JSON file

A JSON syntax error is always an error (the reader cannot find the next row). A row that is
valid JSON but not a conversation (wrong keys, roles out of order, <image> misplaced, image
file missing) is an error naming it, or, with `skip_bad=True` (`train --skip-bad-rows`), is
skipped and counted.

Choices that are ours: the `<image>` placeholder may sit anywhere in the first human turn
(LLaVA data puts it first or last); we remove it and its newline and put the image where the
template has it, first. LLaVA-1.5's Vicuna system prompt ("A chat between a curious user and
...") is not added: the project's template has none. A text-only row gets the same template
without the image.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from minihires.model import Batch, image_inputs, slicing
from minihires.model.config import ModelConfig
from minihires.model.tokenizer import IGNORE_INDEX, IMAGE_TOKEN

_CHUNK = 1 << 20                 # bytes read at a time
MAX_ROW_CHARS = 64 << 20         # a row longer than this is an error (not a conversation)



class BadData(ValueError):
    """A data file or row that cannot be read (the command line reports it as `error: ...`)."""

    def __init__(self, message: str = ""):
        # a DataLoader worker's BadData comes back as BadData("Caught BadData in DataLoader
        # worker process N. Original Traceback ... BadData: <message>"): keep the message
        if message.startswith("Caught BadData in DataLoader worker"):
            message = message.rstrip().splitlines()[-1].partition("BadData: ")[2] or message
        super().__init__(message)

# ----------------------------------------------------------------------------- the JSON array

def rows(path: str | os.PathLike) -> Iterator[object]:
    """The elements of the JSON array in `path`, one at a time (`json.JSONDecoder.raw_decode`
    over a buffer refilled as needed). ValueError naming the file and the row on bad JSON."""
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:        # -sig: a leading BOM is skipped
        buf, pos, eof = "", 0, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(_CHUNK)
            if not chunk:
                eof = True
                return False
            buf, pos = buf[pos:] + chunk, 0
            return True

        def skip_space() -> str | None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf):
                    return buf[pos]
                if not fill():
                    return None

        def closed() -> None:                 # at the array's ']': nothing may follow
            nonlocal pos
            pos += 1
            c = skip_space()
            if c is not None:
                raise ValueError(f"{path}: text after the array's closing ']' (starting {c!r}); "
                                 "a LLaVA file is one JSON array")

        try:
            first = skip_space()
            if first != "[":
                raise ValueError(f"{path}: {'empty' if first is None else 'not a JSON array of rows'}"
                                 " (LLaVA's format is [{...}, {...}])")
            pos += 1
            index = 0
            if skip_space() == "]":
                return closed()
            while True:
                while True:                              # one element, reading more as needed
                    try:
                        value, end = decoder.raw_decode(buf, pos)
                        break
                    except json.JSONDecodeError as e:   # e's line and column count in the
                        if len(buf) - pos > MAX_ROW_CHARS or not fill():   # buffer, not the file
                            raise ValueError(f"{path}: row {index}: not valid JSON ({e.msg} at "
                                             f"character {e.pos - pos} of the row)") from None
                pos = end
                yield value
                index += 1
                c = skip_space()
                if c == "]":
                    return closed()
                if c != ",":
                    raise ValueError(f"{path}: after row {index - 1}: expected ',' or ']', got "
                                     f"{'the end of the file' if c is None else repr(c)}")
                pos += 1
                skip_space()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e})") from None


# ----------------------------------------------------------------------------- one row

def _rows(path):
    try:
        yield from rows(path)
    except ValueError as e:
        raise BadData(str(e)) from None


def row_name(row, index: int) -> str:
    rid = row.get("id") if isinstance(row, dict) else None
    return f"row {index}" + (f" (id {rid!r})" if isinstance(rid, (str, int)) else "")


def check_row(row, index: int) -> tuple[str | None, list[tuple[str, str]]]:
    """(image path or None, [(question, answer), ...]) of one row; ValueError naming the row
    and the field when it is not a LLaVA conversation (see the module doc)."""
    def bad(what: str) -> ValueError:
        return ValueError(f"{row_name(row, index)}: {what}")

    if not isinstance(row, dict):
        raise bad(f"must be a JSON object, got {type(row).__name__}")
    image = row.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise bad(f"image must be a file name, got {image!r}")
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise bad("conversations must be a non-empty list of {from, value} turns")
    if len(conv) % 2:
        raise bad(f"conversations has {len(conv)} turns; they must alternate human, gpt and "
                  "end with gpt")
    texts = []
    for k, turn in enumerate(conv):
        want = "human" if k % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != want:
            got = turn.get("from") if isinstance(turn, dict) else turn
            raise bad(f"conversations[{k}].from must be {want!r}, got {got!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise bad(f"conversations[{k}].value must be a string, got {type(value).__name__}")
        n = value.count(IMAGE_TOKEN)
        if n and not (k == 0 and image is not None and n == 1):
            raise bad(f"conversations[{k}].value holds {n} {IMAGE_TOKEN}; only the first human "
                      f"turn of a row with an image may, once")
        texts.append(value)
    if image is not None and IMAGE_TOKEN not in texts[0]:
        raise bad(f"has an image but its first human turn has no {IMAGE_TOKEN}")
    first = texts[0].replace(IMAGE_TOKEN + "\n", "").replace("\n" + IMAGE_TOKEN, "")
    texts[0] = first.replace(IMAGE_TOKEN, "").strip()
    return image, [(texts[k], texts[k + 1]) for k in range(0, len(texts), 2)]


def encode(tokenizer, turns: Sequence[tuple[str, str]], image: bool = True
           ) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation in the chat template (labels: answers and </s> only).
    With an image this is exactly `Tokenizer.conversation(turns)`."""
    if image:
        return tokenizer.conversation(turns)
    ids: list[int] = [tokenizer.bos_id]
    labels: list[int] = [IGNORE_INDEX]
    for question, answer in turns:
        prompt = tokenizer.encode(f"USER: {question} ASSISTANT:")
        target = tokenizer.encode(answer, eos=True)
        ids += prompt + target
        labels += [IGNORE_INDEX] * len(prompt) + target
    return ids, labels


def texts(path) -> Iterator[str]:
    """Every question and answer of a file (for training a tokenizer), streamed; bad rows
    are passed over (the training reader reports them)."""
    for i, row in enumerate(_rows(path)):
        try:
            _, turns = check_row(row, i)
        except ValueError:
            continue
        for q, a in turns:
            yield q
            yield a


def count_rows(path) -> int:
    """The rows of a file (streamed); BadData when it is not a JSON array."""
    return sum(1 for _ in _rows(path))


# ----------------------------------------------------------------------------- batches

def collate(examples: Sequence[tuple], pad_id: int) -> Batch:
    """[(crops or None, grid or None, ids, labels)] -> a right-padded Batch whose
    pixel_values and grids hold the image rows only (text-only rows have no <image>)."""
    B, T = len(examples), max(len(ex[2]) for ex in examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (_, _, ids, lab) in enumerate(examples):
        input_ids[b, :len(ids)] = torch.as_tensor(ids)
        attention_mask[b, :len(ids)] = 1
        labels[b, :len(ids)] = torch.as_tensor(lab)
    crops = [ex[0] for ex in examples if ex[0] is not None]
    pixel_values = torch.cat(crops) if crops else torch.zeros(0)
    grids = [tuple(ex[1]) for ex in examples if ex[0] is not None]
    return Batch(input_ids, attention_mask, labels, pixel_values, grids)


class LlavaStream(IterableDataset):
    """Micro-batches of `batch_size` rows of this rank's shard, forever (epoch after epoch),
    starting at micro-batch `start` (a resumed run's place). Use with
    `DataLoader(stream, batch_size=None, num_workers=N)`. `skipped` counts the bad rows this
    process passed over (its workers' counts stay in the workers)."""

    def __init__(self, path, image_folder, tokenizer, model_cfg: ModelConfig, batch_size: int,
                 rank: int = 0, world: int = 1, start: int = 0, skip_bad: bool = False,
                 max_tokens: int | None = None):
        self.path, self.folder = Path(path), Path(image_folder) if image_folder else None
        self.tokenizer, self.cfg, self.batch_size = tokenizer, model_cfg, batch_size
        self.rank, self.world, self.start, self.skip_bad = rank, world, start, skip_bad
        self.max_tokens = max_tokens or model_cfg.llama.max_position_embeddings
        self.skipped = 0

    def example(self, row, index: int):
        """(crops, grid, ids, labels) of one row; ValueError naming it."""
        image, turns = check_row(row, index)
        ids, labels = encode(self.tokenizer, turns, image is not None)
        if image is None:
            self._check_length(row, index, len(ids))
            return None, None, ids, labels
        if self.folder is None:
            raise ValueError(f"{row_name(row, index)} has an image but no --image-folder was given")
        path = self.folder / image
        if not path.is_file():
            raise ValueError(f"{row_name(row, index)}: image {path} does not exist (or is not "
                             "a file)")
        try:
            crops, grid = image_inputs(path, self.cfg)
        except (OSError, ValueError) as e:
            why = str(e) if str(path) in str(e) else f"cannot read image {path} ({e})"
            raise ValueError(f"{row_name(row, index)}: {why}") from None
        self._check_length(row, index, len(ids) - 1 + slicing.num_image_tokens(grid, self.cfg))
        return crops, grid, ids, labels

    def _check_length(self, row, index: int, n: int) -> None:
        if n > self.max_tokens:
            raise ValueError(f"{row_name(row, index)}: {n} tokens (text + image), more than "
                             f"the LLM's {self.max_tokens} positions")

    def _shard(self) -> Iterator[tuple]:
        """This rank's good examples, epoch after epoch."""
        while True:
            found = False
            for i, row in enumerate(_rows(self.path)):
                if i % self.world != self.rank:
                    continue
                try:
                    ex = self.example(row, i)
                except ValueError as e:
                    if not self.skip_bad:
                        raise BadData(f"{self.path}: {e} (--skip-bad-rows skips such rows)") from None
                    self.skipped += 1
                    continue
                found = True
                yield ex
            if not found:
                raise BadData(f"{self.path}: rank {self.rank} of {self.world} found no usable "
                                 "row (the file has fewer rows than ranks, or all are bad)")

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        shard, k = self._shard(), 0
        while True:
            group = [next(shard) for _ in range(self.batch_size)]
            if k >= self.start and (k - self.start) % workers == worker:
                yield collate(group, self.tokenizer.pad_id)
            k += 1


# ----------------------------------------------------------------------------- EntityGrid

def entitygrid_row(index: int, image: str, turns: Sequence[tuple[str, str]], **extra) -> dict:
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": (IMAGE_TOKEN + "\n" if k == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return {"id": f"{index:06d}", "image": image, "conversations": conv, **extra}


def write_json_rows(path, rows_: Iterator[dict]) -> int:
    """Write rows as one JSON array, one row per line, without holding them; -> count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for row in rows_:
            f.write(("\n" if n == 0 else ",\n") + json.dumps(row))
            n += 1
        f.write("\n]\n")
    return n
