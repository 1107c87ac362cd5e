"""Writing files: a directory that a reader sees old or new, never half of either; a generated block
inside a hand-written document."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden sibling dir to fill; it replaces `out_dir` whole when the block succeeds.

    The staging dir gets the usual permissions (0755 under the usual umask): `mkdtemp` makes it
    0700, and renamed into place it would stay unreadable to anyone else on shared storage. On an
    exception it is removed and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def replace_marked_block(text: str, marker: str, block: str, source: str = "the text") -> str:
    """`text` with what lies between `<!-- marker -->` and `<!-- /marker -->` replaced by `block`: how
    a README holds figures generated from a results file (the tests compare the two).

    Raises:
        ValueError: not exactly one such block (`source` names the file).
    """
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{source}: expected one {start} ... {end} block to write the figures into")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{block}{end}{tail}"
