"""SentencePiece tokenizer wrapper with GLM special tokens, in each family's id layout.

Default layout (as ChatGLM2/3 do it): the sentencepiece model holds the text pieces, ids
``0..n-1``; GLM's special tokens are appended after it in the order
``[MASK] [gMASK] [sMASK] sop eop`` unless the model config names other ids. Text may
contain the literal markers ``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``<sop>``, ``<eop>``,
which are encoded as those ids.

Family layouts, read from the files and the model config:

* image tokens before the text (GLM-130B's icetk: 20000; ChatGLM-6B before the April-2023
  "slim" update: 20000, after it: 0): text id = piece id + ``image_tokens``. The number
  comes from ``num_image_tokens`` in a ``tokenizer_config.json`` next to the model file,
  else from the config (GLM-130B, or ChatGLM-6B with the original [MASK] id 150000).
* special tokens that are pieces of the model (ChatGLM-6B's ``ice_text.model``) are found
  by name when the config does not give their ids.
* icetk text pre-processing when the model has a ``<n>`` piece (GLM-130B, ChatGLM-6B):
  newline -> ``<n>``, tab -> ``<|tab|>``, runs of 2..80 spaces -> ``<|blank_k|>``; decoding
  reverses it.
* role tokens ``<|system|> <|user|> <|assistant|> <|observation|>`` right after ``eop``
  (ChatGLM3: 64794..64797, GLM-4: 151335..151338), and GLM-4's ``<|endoftext|>``.
* GLM-4-9B's ``tokenizer.model`` is a tiktoken BPE file (:class:`TiktokenModel`); its
  specials come from the config (151329..).
"""
from __future__ import annotations

import base64
import binascii
import os
import re

import sentencepiece as spm

from .config import GLMConfig
from .errors import GLMError
from .files import read_json

SPECIAL_ORDER = ("mask", "gmask", "smask", "sop", "eop")
MARKERS = {"[MASK]": "mask", "[gMASK]": "gmask", "[sMASK]": "smask", "<sop>": "sop", "<eop>": "eop"}
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_PIECE_NAMES = {"mask": ("[MASK]",), "gmask": ("[gMASK]",), "smask": ("[sMASK]",), "sop": ("<sop>", "sop"),
                "eop": ("<eop>", "eop")}
_ROLE_FAMILIES = ("chatglm3", "glm-4")
MAX_BLANK = 80


def image_tokens(model_file, config: GLMConfig | None) -> int:
    """How many ids precede the text pieces (icetk image tokens)."""
    tc = os.path.join(os.path.dirname(os.fspath(model_file)), "tokenizer_config.json")
    if os.path.isfile(tc):
        try:
            meta = read_json(tc, "tokenizer config")
        except GLMError:  # the optional hint is unreadable: fall back to the config's family
            meta = None
        n = meta.get("num_image_tokens") if isinstance(meta, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
    if config is None:
        return 0
    if config.family == "glm-130b" or (config.family == "chatglm-6b" and config.mask_token_id == 150000):
        return 20000
    return 0


class TiktokenModel:
    """GLM-4-9B's ``tokenizer.model``: lines ``<base64 token bytes> <rank>``, a byte-level BPE
    over a GPT-4-style pre-tokenizer split; ids are the ranks. It offers the few
    sentencepiece methods :class:`Tokenizer` uses, so the id layout code is shared."""

    PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

    def __init__(self, ranks: dict[bytes, int]):
        import regex

        self.ranks = ranks
        self.by_id = {v: k for k, v in ranks.items()}
        self.split = regex.compile(self.PATTERN)

    @classmethod
    def load(cls, path) -> "TiktokenModel | None":
        ranks = {}
        try:
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        tok, rank = line.split()
                        ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except (ValueError, OSError, binascii.Error):
            return None
        return cls(ranks) if ranks else None

    def _bpe(self, b: bytes) -> list[int]:
        parts = [b[i:i + 1] for i in range(len(b))]
        while len(parts) > 1:  # merge the adjacent pair of lowest rank, leftmost first
            best = None
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.split.findall(text):
            b = piece.encode("utf-8")
            ids.extend([self.ranks[b]] if b in self.ranks else self._bpe(b))
        return ids

    def decode(self, ids) -> str:
        return b"".join(self.by_id[int(i)] for i in ids).decode("utf-8", errors="replace")

    def get_piece_size(self) -> int:
        return len(self.ranks)

    def id_to_piece(self, i: int) -> str:
        return self.by_id[int(i)].decode("utf-8", errors="replace")

    def piece_to_id(self, piece: str) -> int:
        return self.ranks.get(piece.encode("utf-8"), -1)

    def unk_id(self) -> int:
        return -1

    eos_id = pad_id = unk_id


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, config: GLMConfig | None = None):
        if not os.path.isfile(model_file):
            raise GLMError("tokenizer model not found", model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            self.sp = TiktokenModel.load(model_file)  # GLM-4-9B ships a tiktoken BPE file
            if self.sp is None:
                raise GLMError(f"neither a sentencepiece model nor a tiktoken BPE file: {e}", model_file) from None
        n = self.sp.get_piece_size()
        self.offset = image_tokens(model_file, config)
        self.ice = self.sp.piece_to_id("<n>") != self.sp.unk_id()  # icetk pre-processing
        self.special = {}
        for i, name in enumerate(SPECIAL_ORDER):
            cid = getattr(config, f"{name}_token_id", None) if config is not None else None
            if cid is None:
                piece = next((self.sp.piece_to_id(p) for p in _PIECE_NAMES[name]
                              if self.sp.piece_to_id(p) != self.sp.unk_id()), None)
                cid = n + self.offset + i if piece is None else piece + self.offset
            self.special[name] = cid
        self.markers = {m: self.special[name] for m, name in MARKERS.items()}
        family = getattr(config, "family", "") or ""
        if family.startswith(_ROLE_FAMILIES):
            self.markers.update({r: self.special["eop"] + 1 + i for i, r in enumerate(ROLES)})
        if family.startswith("glm-4"):
            self.markers["<|endoftext|>"] = self.special["mask"] - 1
        self._marker_re = re.compile("(" + "|".join(re.escape(m) for m in self.markers) + ")")
        self.eos_id = self.sp.eos_id() + self.offset if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() + self.offset if self.sp.pad_id() >= 0 else 0
        if self.ice and config is not None and config.pad_token_id is not None:
            self.pad_id = config.pad_token_id
        self._by_id = {i: m for m, i in self.markers.items()}
        self.vocab_size = max(n + self.offset + len(SPECIAL_ORDER), max(self._by_id) + 1)

    def _preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for k in range(MAX_BLANK, 1, -1):
            text = text.replace(" " * k, f"<|blank_{k}|>")
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return re.sub(r"<\|blank_(\d+)\|>", lambda m: " " * int(m.group(1)), text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of plain text (one sentencepiece call, no markers)."""
        if self.ice:
            text = self._preprocess(text)
        return [i + self.offset for i in self.sp.encode(text)] if self.offset else self.sp.encode(text)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; the literal markers ``[MASK]``, ``[gMASK]`` ... become their ids."""
        ids: list[int] = []
        for part in self._marker_re.split(text):
            if not part:
                continue
            if part in self.markers:
                ids.append(self.markers[part])
            else:
                ids.extend(self.encode_text(part))
        return ids

    def decode(self, ids, keep_special: bool = False) -> str:
        """Text of ``ids``; special tokens are dropped unless ``keep_special``."""
        out: list[str] = []
        run: list[int] = []
        n = self.sp.get_piece_size()

        def flush():
            if run:
                text = self.sp.decode(run)
                # sentencepiece drops the word-boundary space of a run's first piece; keep it
                # when the run does not start the text
                if out and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in (int(x) for x in ids):
            if i not in self._by_id and self.offset <= i < n + self.offset and not (self.ice and i == self.pad_id):
                run.append(i - self.offset)  # text piece (image ids, and icetk pad, are dropped)
                continue
            flush()
            if keep_special and i in self._by_id:
                out.append(self._by_id[i])
        flush()
        text = "".join(out)
        return self._postprocess(text) if self.ice else text
