"""Training text on disk: corpus documents, a held-out split, tokenised memory-mapped shards.

Corpus files are UTF-8 text with one document per paragraph (documents separated by a
blank line; a file without any blank line has one document per line), as in
``data/corpus``. The held-out split is chosen per document by a hash of
its text (``sha1 % heldout_every == 0``), so it is the same on every machine and does not
move when files are added.

The training documents are shuffled once (fixed seed) before they are written, so a run
that does not finish an epoch still sees every source. Shards are flat arrays of token ids (``uint16`` when the vocabulary allows, else
``uint32``) in ``<split>.bin`` with ``index.json`` describing them; documents are joined
with the end-of-document id. Readers ``np.memmap`` them, so a training process touches
only the pages it reads and several ranks share the page cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from glm_runtime.converters.native import atomic_dir
from glm_runtime.core.errors import GLMError
from glm_runtime.core.files import read_json

INDEX = "index.json"
SHARD_FORMAT = "glm-runtime-shards/1"


def read_documents(files: list[Path]) -> list[str]:
    docs = []
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GLMError("corpus file not found", f) from None
        except UnicodeDecodeError as e:
            raise GLMError(f"corpus file is not UTF-8 ({e.reason} at byte {e.start})", f) from None
        # Documents are separated by blank lines; a file with no blank line at all holds one
        # document per line (as en_python_docs.txt: one docstring paragraph per line).
        parts = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
        docs.extend(p.strip() for p in parts if p.strip())
    return docs


def is_heldout(doc: str, every: int) -> bool:
    return int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:8], "little") % every == 0


def split_documents(docs: list[str], every: int) -> tuple[list[str], list[str]]:
    """(train, heldout) documents; ``every`` = 1 in how many documents is held out."""
    train, held = [], []
    for d in docs:
        (held if is_heldout(d, every) else train).append(d)
    return train, held


def corpus_files(corpus: str | os.PathLike) -> list[Path]:
    p = Path(corpus)
    if not p.exists():
        raise GLMError("corpus not found", p)
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise GLMError("no *.txt corpus files", p)
    return files


def fingerprint(files: list[Path], extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for f in files:
        h.update(f.name.encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def write_shards(out_dir: str | os.PathLike, splits: dict[str, list[list[int]]], eod_id: int, vocab_size: int,
                 source: str) -> Path:
    """Write ``{split: [doc ids...]}`` as ``<split>.bin`` + ``index.json`` (atomically)."""
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    index = {"format": SHARD_FORMAT, "dtype": np.dtype(dtype).name, "eod_id": eod_id, "vocab_size": vocab_size,
             "source": source, "splits": {}}
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for name, docs in splits.items():
            flat = []
            for d in docs:
                flat.extend(d)
                flat.append(eod_id)
            arr = np.asarray(flat, dtype=dtype)
            arr.tofile(tmp / f"{name}.bin")
            index["splits"][name] = {"file": f"{name}.bin", "tokens": int(arr.size), "documents": len(docs)}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return Path(out_dir)


def read_index(shard_dir: str | os.PathLike) -> dict:
    f = Path(shard_dir) / INDEX
    if not f.is_file():
        raise GLMError("token shards not found (no index.json)", shard_dir)
    index = read_json(f, "shard index")
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise GLMError(f"not a shard index of format {SHARD_FORMAT}", f)
    return index


@dataclass
class TokenStream:
    """One split of the shards as an endless stream: ``take(offset, n)`` reads ``n`` ids
    from ``offset``, wrapping around at the end (an epoch boundary)."""

    tokens: np.ndarray  # memmap
    eod_id: int

    @classmethod
    def open(cls, shard_dir: str | os.PathLike, split: str) -> "TokenStream":
        index = read_index(shard_dir)
        if split not in index["splits"]:
            raise GLMError(f"shards have no split {split!r} (have {', '.join(index['splits'])})", shard_dir)
        info = index["splits"][split]
        f = Path(shard_dir) / info["file"]
        expect = info["tokens"] * np.dtype(index["dtype"]).itemsize
        if not f.is_file() or f.stat().st_size != expect:
            raise GLMError(f"shard file is missing or truncated (expected {expect} bytes)", f)
        if info["tokens"] == 0:
            raise GLMError(f"split {split!r} is empty", f)
        return cls(np.memmap(f, dtype=index["dtype"], mode="r"), index["eod_id"])

    def __len__(self) -> int:
        return int(self.tokens.size)

    def take(self, offset: int, n: int) -> np.ndarray:
        size = len(self)
        start = offset % size
        out = np.empty(n, dtype=np.int64)
        got = 0
        while got < n:
            k = min(n - got, size - start)
            out[got:got + k] = self.tokens[start:start + k]
            got += k
            start = 0
        return out


def build_shards(files: list[Path], tokenizer, out_dir: str | os.PathLike, heldout_every: int,
                 progress: bool = True) -> Path:
    """Tokenise the corpus into train/heldout shards (reused when already built from the
    same files and tokenizer)."""
    tok_id = hashlib.sha1(tokenizer.sp.serialized_model_proto()).hexdigest()[:16]
    source = fingerprint(files, f"{tok_id}:{heldout_every}")
    out = Path(out_dir)
    if (out / INDEX).is_file():
        try:
            if read_index(out).get("source") == source:
                return out
        except GLMError:
            pass
    train, held = split_documents(read_documents(files), heldout_every)
    # Shuffle the training documents once (fixed seed): the corpus files are by language
    # and source, and a run that reads them in order drifts from one to the next.
    order = np.random.default_rng(0).permutation(len(train))
    train = [train[i] for i in order]
    # sp.encode, not the wrapper: literal "[MASK]" in a document is text, not a special token.
    enc = {name: [tokenizer.sp.encode(d) for d in tqdm(docs, desc=f"tokenising {name}", disable=not progress,
                                                     leave=False)]
           for name, docs in (("train", train), ("heldout", held))}
    eod = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.special["eop"]
    return write_shards(out, enc, eod, tokenizer.vocab_size, source)


def train_tokenizer(files: list[Path], prefix: Path, vocab_size: int, heldout_every: int) -> Path:
    """Train a sentencepiece unigram model on the train split of the corpus.

    Layout as the bundled models use it (see glm_runtime.core.tokenizer): unk 0, pad 1, eos 2 (the
    end-of-document id), byte fallback so no character is unknown, a newline piece so
    poems and code keep their lines; GLM's five special tokens are appended after it by
    the tokenizer wrapper.
    """
    train, _ = split_documents(read_documents(files), heldout_every)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    text = prefix.with_suffix(".txt")
    # sentencepiece trains on lines: one document per line, inner newlines as spaces (the
    # user-defined newline piece encodes them at tokenisation time).
    text.write_text("\n".join(d.replace("\n", " ") for d in train) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
            character_coverage=0.9995, byte_fallback=True, user_defined_symbols=["\n"],
            normalization_rule_name="identity", split_digits=True,
            num_threads=1, shuffle_input_sentence=False, max_sentence_length=8192, bos_id=-1, eos_id=2,
            unk_id=0, pad_id=1, minloglevel=2)
    except RuntimeError as e:  # sentencepiece's refusal (a vocabulary larger than the corpus allows ...)
        raise GLMError(f"training the tokenizer failed: {str(e).strip().splitlines()[-1]}", prefix.parent) from None
    finally:
        text.unlink(missing_ok=True)
    return prefix.with_suffix(".model")
