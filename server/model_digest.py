"""What a model's pixels depend on besides the request: the result cache's model fingerprint.

``files_digest`` hashes every file of a model directory (weights, configs, tokenizer, the
scheduler config: all change pixels), which reads the whole model once. sha256 runs at about
2 GB/s on one core of the development machine (measured on data in memory), so SD 1.5's fp16
weights (~2 GB) take about a second and a directory holding SDXL in fp32 and fp16 (~20 GB)
about ten, more when the disk reads slower than that. It runs once per start, only with the
cache on, in a thread while nothing is served yet; a memo keyed by each file's (path, size,
mtime) spares a process that loads the same directory again (tests, a reload) the second read.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

_CHUNK = 1 << 20
_memo: dict[tuple[tuple[str, int, int], ...], str] = {}
_memo_lock = threading.Lock()


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file())


def files_digest(root: Path) -> str:
    """sha256 over each file under ``root`` (or of ``root``, a file): its path relative to
    ``root``, its size, and the sha256 of its bytes, in sorted order."""
    files = _files(root)
    base = root if root.is_dir() else root.parent
    stats = tuple((str(p.resolve()), (st := p.stat()).st_size, st.st_mtime_ns) for p in files)
    with _memo_lock:
        known = _memo.get(stats)
    if known is not None:
        return known
    outer = hashlib.sha256()
    for p, (_, size, _) in zip(files, stats, strict=True):
        inner = hashlib.sha256()
        with p.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                inner.update(chunk)
        outer.update(f"{p.relative_to(base).as_posix()}\0{size}\0{inner.hexdigest()}\n".encode())
    digest = outer.hexdigest()
    with _memo_lock:
        _memo[stats] = digest
    return digest
