"""SentencePiece tokenizer wrapper with GLM special tokens.

Layout (as ChatGLM2/3 do it): the sentencepiece model holds the text pieces, ids
``0..n-1``; GLM's special tokens are appended after it in the order
``[MASK] [gMASK] [sMASK] sop eop`` unless the model config names other ids. Text may
contain the literal markers ``[MASK]``, ``[gMASK]``, ``[sMASK]``, ``<sop>``, ``<eop>``,
which are encoded as those ids.
"""
from __future__ import annotations

import os
import re

from .config import GLMConfig
from .errors import GLMError

SPECIAL_ORDER = ("mask", "gmask", "smask", "sop", "eop")
MARKERS = {"[MASK]": "mask", "[gMASK]": "gmask", "[sMASK]": "smask", "<sop>": "sop", "<eop>": "eop"}
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MARKERS) + ")")


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, config: GLMConfig | None = None):
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise GLMError("tokenizer model not found", model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise GLMError(f"not a sentencepiece model: {e}", model_file) from None
        n = self.sp.get_piece_size()
        self.special = {}
        for i, name in enumerate(SPECIAL_ORDER):
            cid = getattr(config, f"{name}_token_id", None) if config is not None else None
            self.special[name] = n + i if cid is None else cid
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self._by_id = {self.special[name]: marker for marker, name in MARKERS.items()}
        self.vocab_size = n + len(SPECIAL_ORDER)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; the literal markers ``[MASK]``, ``[gMASK]`` ... become their ids."""
        ids: list[int] = []
        for part in _MARKER_RE.split(text):
            if not part:
                continue
            if part in MARKERS:
                ids.append(self.special[MARKERS[part]])
            else:
                ids.extend(self.sp.encode(part))
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
            if 0 <= i < n:
                run.append(i)
                continue
            flush()
            if keep_special and i in self._by_id:
                out.append(self._by_id[i])
        flush()
        return "".join(out)
