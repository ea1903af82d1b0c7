"""Where text comes from: a named corpus downloaded once into the data folder, or the user's files.

A source has `files()`, one document each, read in pieces by `read_text` so no file needs to fit in memory,
and a `fingerprint()` of their content, which keys the token cache. Every text must be UTF-8; a file that is
not names the file and the byte offset of the first bad byte.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from lam.data.paths import default_data_dir
from lam.errors import UserError

DOWNLOAD_TIMEOUT_S = 30
READ_BLOCK_BYTES = 1 << 20  # files are decoded (and later encoded) about this many bytes at a time


def corpus_name(data: dict) -> str:
    """What a data config reads: the path of a custom corpus, the address of a downloaded one (a `source` node in
    the configs of checkpoints written before 2026-12-02), else its class."""
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    return str(data.get("path") or data.get("url") or source.get("url") or source.get("_target_")
               or data.get("_target_"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: Path, errors: str = "strict", block_bytes: int = READ_BLOCK_BYTES) -> Iterator[str]:
    """The UTF-8 text of a file in pieces of about `block_bytes`, each ending after a line break where it has
    one (so that a piece rarely cuts a word). `errors="replace"` reads invalid bytes as U+FFFD."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset, rest = 0, ""  # bytes read so far; text held back after the last line break
    with open(path, "rb") as f:
        while True:
            block = f.read(block_bytes)
            held = len(decoder.getstate()[0])  # bytes of a character split by the previous block
            try:
                text = rest + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UserError(f"{path} is not UTF-8 text: invalid byte 0x{e.object[e.start]:02x} at offset "
                                f"{offset - held + e.start} (data.errors=replace reads it anyway)") from None
            offset += len(block)
            cut = len(text) if not block else text.rfind("\n") + 1 or len(text)
            rest = text[cut:]
            if cut:
                yield text[:cut]
            if not block:
                break


def text_length(path: Path, errors: str = "strict") -> int:
    """The characters of the file's text; 0 where it holds nothing but whitespace."""
    length, blank = 0, True
    for text in read_text(path, errors):
        length += len(text)
        blank = blank and text.isspace()
    return 0 if blank else length


class Download:
    """A public corpus: used from `data_dir` when present, otherwise downloaded there, sha256-checked."""

    def __init__(self, url: str, sha256: str, filename: str, data_dir: str | None = None, errors: str = "strict"):
        self.url, self.sha256, self.filename, self.errors = url, sha256, filename, errors
        self.data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()

    @property
    def path(self) -> Path:
        return self.data_dir / self.filename

    def fetch(self) -> Path:
        path = self.path
        if path.exists():
            if sha256_file(path) != self.sha256:
                raise UserError(f"{path} does not have the expected sha256 {self.sha256[:12]}…: "
                                f"delete it to download {self.url} again")
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{self.filename}.", delete=False) as tmp:
            try:
                self._download(tmp)
                tmp.close()
                if (digest := sha256_file(Path(tmp.name))) != self.sha256:
                    raise UserError(f"download of {self.url} has sha256 {digest[:12]}…, "
                                    f"expected {self.sha256[:12]}…")
                os.replace(tmp.name, path)  # only a complete, verified file ever has the final name
            finally:
                Path(tmp.name).unlink(missing_ok=True)
        return path

    def _download(self, out) -> None:
        try:
            response = urllib.request.urlopen(self.url, timeout=DOWNLOAD_TIMEOUT_S)
        except OSError as e:
            raise UserError(f"could not download {self.url} ({e}); put {self.filename} in {self.data_dir} "
                            f"or point LAM_DATA_DIR at a folder that has it") from None
        total = int(response.headers.get("Content-Length") or 0) or None
        columns = (TextColumn(self.filename), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with response, Progress(*columns, transient=True) as progress:
            task = progress.add_task("download", total=total)
            for block in iter(lambda: response.read(1 << 16), b""):
                out.write(block)
                progress.advance(task, len(block))

    def files(self) -> list[Path]:
        return [self.fetch()]

    def fingerprint(self) -> str:
        return self.sha256


class LocalText:
    """The user's own text: one file, or every file under a folder that matches `glob` (sorted by path)."""

    def __init__(self, path: str, glob: str = "**/*.txt", errors: str = "strict"):
        if path is None or str(path) == "":
            raise UserError("data=custom needs a file or folder: add data.path=PATH")
        self.path, self.glob, self.errors = Path(path).expanduser(), glob, errors

    def files(self) -> list[Path]:
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist")
        if self.path.is_file():
            return [self.path]
        files = sorted(p for p in self.path.glob(self.glob) if p.is_file())
        if not files:
            if not any(self.path.iterdir()):
                raise UserError(f"{self.path} is an empty folder")
            raise UserError(f"{self.path} has no files matching {self.glob!r} (set data.glob to choose others)")
        return files

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in self.files():
            digest.update(str(path.relative_to(self.path) if path != self.path else path.name).encode())
            digest.update(sha256_file(path).encode())
        return digest.hexdigest()

