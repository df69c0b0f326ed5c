"""Demo corpus and tokenizer: real text on every machine, no download.

The default corpus is the Python standard library's own ``.py`` files (found through
``sysconfig``), read in a fixed hashed-path order until ``max_tokens`` tokens are collected; the
last ``val_fraction`` of them is the validation split. The tokenizer
is word-level: identifiers, numbers and single punctuation characters, with the ``vocab_size - 1``
most frequent words (ties broken alphabetically) plus ``<unk>`` at id 0. Everything is
deterministic, so every rank and every machine builds the same ids from the same files.

    python examples/data.py --out runs/data                 # prepare the stdlib corpus
    python examples/data.py --out runs/data --data ~/books  # your own text files / directories
    python examples/data.py --check ~/books                 # exit 1 with a message if no text

A prepared directory holds ``tokens_N.npy`` (int32 [N], train then validation), ``vocab.json``
(the words, id order), ``token_counts.npy`` (int64 [V], training-split count of each id, used
for the frequency correlation rho) and ``meta.json``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Corpus", "NoTextError", "default_corpus_paths", "find_text_files", "prepare", "load"]

_WORD = re.compile(r"[A-Za-z_]+|[0-9]+|[^\sA-Za-z_0-9]")
_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".text", ""}
UNK = "<unk>"


class NoTextError(ValueError):
    """A data path holds no readable text."""


@dataclass(frozen=True)
class Corpus:
    """A tokenized corpus.

    Attributes:
        tokens_N: int32 token ids, training split first.
        n_train: Number of training tokens (the rest is validation).
        vocab: Words by id (``vocab[0]`` is ``<unk>``).
        counts_V: int64 count of each id in the training split.
    """

    tokens_N: np.ndarray
    n_train: int
    vocab: list[str]
    counts_V: np.ndarray

    @property
    def train_N(self) -> np.ndarray:
        return self.tokens_N[: self.n_train]

    @property
    def val_N(self) -> np.ndarray:
        return self.tokens_N[self.n_train:]


def default_corpus_paths() -> list[Path]:
    """The standard library directory of the running Python."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def _is_text(path: Path, suffixes: frozenset[str] | set[str]) -> bool:
    """Cheap test: a known text suffix and no NUL byte in the first 4 KiB."""
    if path.suffix.lower() not in suffixes:
        return False
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return bool(head.strip()) and b"\0" not in head


def _shuffle_key(path: Path, root: Path) -> str:
    """A fixed pseudo-random order: the hash of the path under its root, the same on every machine.

    Sorted names would fill the corpus with the alphabetically first packages and leave the
    validation split to whatever comes last; hashed names mix the whole tree into both.
    """
    return hashlib.sha1(path.relative_to(root).as_posix().encode()).hexdigest()


def find_text_files(paths: Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Text files under ``paths`` (files or directories), without ``site-packages``.

    Files of a directory come in the fixed pseudo-random order of :func:`_shuffle_key`.

    ``None`` means the default corpus: the ``.py`` files of the standard library.

    Raises:
        NoTextError: A path does not exist, or nothing under the paths is non-empty text.
    """
    suffixes = _TEXT_SUFFIXES if paths else {".py"}
    files: list[Path] = []
    for raw in paths or default_corpus_paths():
        path = Path(raw).expanduser()
        if not path.exists():
            raise NoTextError(f"data path {str(path)!r} does not exist. Pass existing text files or "
                              "directories (--data), or omit --data for the stdlib corpus.")
        if path.is_file():
            candidates = [path]
        else:
            candidates = sorted((p for p in path.rglob("*")
                                 if p.is_file() and "site-packages" not in p.parts
                                 and "__pycache__" not in p.parts),
                                key=lambda p, root=path: _shuffle_key(p, root))
        found = [p for p in candidates if _is_text(p, suffixes)]
        if not found:
            raise NoTextError(
                f"data path {str(path)!r} holds no text: expected non-empty files ending in "
                f"{sorted(s for s in _TEXT_SUFFIXES if s)} or with no suffix, and no binary content.")
        files.extend(found)
    return files


def _words(files: Iterable[Path], max_tokens: int) -> list[str]:
    """Words of the files in order, stopping after ``max_tokens``."""
    words: list[str] = []
    for path in files:
        words.extend(_WORD.findall(path.read_text(encoding="utf-8", errors="replace")))
        if len(words) >= max_tokens:
            return words[:max_tokens]
    return words


def build_vocab(words: Sequence[str], vocab_size: int) -> list[str]:
    """``<unk>`` then the ``vocab_size - 1`` most frequent words (ties alphabetical)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size={vocab_size} is too small; expected >= 2.")
    counts = collections.Counter(words)
    counts.pop(UNK, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK] + [w for w, _ in ranked[: vocab_size - 1]]


def encode(words: Sequence[str], vocab: Sequence[str]) -> np.ndarray:
    """int32 ids of ``words``; out-of-vocabulary words map to 0 (``<unk>``)."""
    index = {w: i for i, w in enumerate(vocab)}
    return np.fromiter((index.get(w, 0) for w in words), dtype=np.int32, count=len(words))


def _cache_key(files: Sequence[Path], vocab_size: int, max_tokens: int, val_fraction: float) -> str:
    h = hashlib.sha1(f"{vocab_size}/{max_tokens}/{val_fraction}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def prepare(out_dir: str | os.PathLike, *, paths: Sequence[str | os.PathLike] | None = None,
            vocab_size: int = 4096, max_tokens: int = 1_000_000,
            val_fraction: float = 0.05) -> Path:
    """Tokenize the corpus into ``out_dir`` (reused when the inputs have not changed).

    The vocabulary is built on the training split only. Writing goes through temporary files and
    renames, so ranks that prepare the same directory at once leave one consistent copy.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    files = find_text_files(paths)
    key = _cache_key(files, vocab_size, max_tokens, val_fraction)
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        return out
    words = _words(files, max_tokens)
    if len(words) < 1000:
        raise NoTextError(f"data paths {[str(p) for p in (paths or default_corpus_paths())]} hold "
                          f"only {len(words)} words; the demo needs at least 1000.")
    n_train = int(len(words) * (1.0 - val_fraction))
    vocab = build_vocab(words[:n_train], vocab_size)
    tokens_N = encode(words, vocab)
    counts_V = np.bincount(tokens_N[:n_train], minlength=len(vocab)).astype(np.int64)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.tmp"
    # np.save appends .npy unless the name already ends in it, so the temporaries keep that ending.
    for name, array in (("tokens_N.npy", tokens_N), ("token_counts.npy", counts_V)):
        tmp = out / f"{name[:-4]}{suffix}.npy"
        np.save(tmp, array)
        os.replace(tmp, out / name)
    meta = {"key": key, "n_tokens": len(words), "n_train": n_train, "vocab_size": len(vocab),
            "n_files": len(files), "first_file": str(files[0]),
            "unk_fraction": float((tokens_N == 0).mean())}
    for name, text in (("vocab.json", json.dumps(vocab)), ("meta.json", json.dumps(meta, indent=1))):
        tmp = out / (name + suffix)
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out


def load(data_dir: str | os.PathLike) -> Corpus:
    """Read a directory written by :func:`prepare`."""
    d = Path(data_dir)
    meta = json.loads((d / "meta.json").read_text())
    return Corpus(tokens_N=np.load(d / "tokens_N.npy"), n_train=int(meta["n_train"]),
                  vocab=json.loads((d / "vocab.json").read_text()),
                  counts_V=np.load(d / "token_counts.npy"))


def add_corpus_and_model_args(p: argparse.ArgumentParser) -> None:
    """The corpus and GPT-size flags the training examples share (train_ds.py, train_fsdp2.py)."""
    p.add_argument("--data", nargs="*", default=None,
                   help="text files or directories (default: the Python standard library)")
    p.add_argument("--data-dir", default=None,
                   help="tokenized corpus directory (built here if absent; default SAVE_DIR/data)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--max-tokens", type=int, default=1_000_000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="*", default=None,
                        help="text files or directories (default: the Python stdlib)")
    parser.add_argument("--out", help="directory to write the tokenized corpus to")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=1_000_000)
    parser.add_argument("--check", nargs="+", metavar="PATH",
                        help="only check that PATHs hold text; exit 1 with a message if not")
    args = parser.parse_args(argv)
    try:
        if args.check:
            files = find_text_files(args.check)
            print(f"ok: {len(files)} text files")
            return 0
        if not args.out:
            parser.error("--out is required (or use --check)")
        out = prepare(args.out, paths=args.data, vocab_size=args.vocab_size,
                      max_tokens=args.max_tokens)
    except NoTextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads((out / "meta.json").read_text()), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
