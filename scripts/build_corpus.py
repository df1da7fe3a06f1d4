"""Build the bundled training corpus from Debian's fortune data packages.

The raw files are not downloaded by the project at run time; a maintainer fetches the
packages once with the system package manager and unpacks them without installing::

    apt-get download fortunes-zh fortunes
    for f in fortunes*.deb; do dpkg -x "$f" unpacked; done
    python scripts/build_corpus.py unpacked/usr/share/games/fortunes

It writes ``data/corpus/zh_classical.txt`` and ``data/corpus/en_fortunes.txt``: one
document per paragraph, documents separated by a blank line (the format the training data
reader expects), ANSI colour codes stripped, deduplicated against each other and against
the other corpus files. Which source files are used and why is in data/corpus/README.md.
"""
from __future__ import annotations

import argparse
import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "corpus"

# Classical Chinese poetry, proverbs and philosophy. Entries of the "chinese" file that
# are modern technical text (Debian documentation excerpts) are dropped by the filter.
ZH_FILES = ("tang300", "song100", "chinese")
# English quotation files of fortune-mod chosen for plain prose; files of song lyrics,
# crude humour, politics or ASCII art are left out.
EN_FILES = ("wisdom", "literature", "science", "tao", "education", "people", "humorists", "platitudes",
            "art", "work", "computers", "riddles", "fortunes", "goedel", "paradoxum", "magic", "kids",
            "love", "food", "pets", "sports", "medicine", "miscellaneous", "news")

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def entries(path: Path) -> list[str]:
    text = ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
    out = []
    for e in re.split(r"\n%\n", text):
        lines = [ln.strip() for ln in e.replace("\t", " ").splitlines()]
        lines = [re.sub(r" {2,}", " ", ln) for ln in lines if ln]
        if lines:
            out.append("\n".join(lines))
    return out


def cjk_share(s: str) -> float:
    chars = [c for c in s if not c.isspace()]
    if not chars:
        return 0.0
    return sum("\u4e00" <= c <= "\u9fff" or unicodedata.category(c).startswith("P") for c in chars) / len(chars)


def keep_zh(e: str) -> bool:
    return ("\ufffd" not in e and not re.search(r"[\u2500-\u257f]", e) and "Debian" not in e
            and cjk_share(e) >= 0.9 and 8 <= len(e) <= 600)


def keep_en(e: str) -> bool:
    letters = sum(c.isalpha() for c in e)
    return (e.isascii() and letters >= 0.6 * len(e) and 40 <= len(e) <= 800
            and not re.search(r"[|_\\/]{3,}|[=*#]{3,}", e))


def key(e: str) -> str:
    return re.sub(r"\W+", "", e.lower())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fortunes_dir", type=Path, help="unpacked usr/share/games/fortunes directory")
    a = ap.parse_args()
    seen = set()
    for other in CORPUS.glob("*.txt"):
        if other.name not in ("zh_classical.txt", "en_fortunes.txt"):
            seen.update(key(p) for p in other.read_text(encoding="utf-8").split("\n\n"))
    for name, files, keep in (("zh_classical.txt", ZH_FILES, keep_zh), ("en_fortunes.txt", EN_FILES, keep_en)):
        docs = []
        for f in files:
            for e in entries(a.fortunes_dir / f):
                k = key(e)
                if keep(e) and k not in seen:
                    seen.add(k)
                    docs.append(e)
        (CORPUS / name).write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        size = (CORPUS / name).stat().st_size
        print(f"{name}: {len(docs)} documents, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
