"""Download OpenAI's released GPT-2 files: temporary name then rename, resume, retry, size and hash checks.

Into a URL (gs://...), each file is downloaded the same way into a local staging directory (kept between
attempts, so a failed download resumes), then uploaded once verified and removed locally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from gpt2_jax import storage
from gpt2_jax.errors import UserError, reason

DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
         "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
# The vocabulary is the same for every size (see ../shared/gpt2/SOURCES.md; tiktoken checks the same).
SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
_CHUNK = 1 << 20


def _sha256(path: storage.AnyPath) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_once(url: str, part: Path, progress: bool, timeout: float) -> None:
    """One attempt: continue `part` from its current size; raises OSError on a cut connection."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked past the end: the part file is already complete
            return
        raise
    with response:
        if have and response.status != 206:  # the server ignored the range: start over
            have = 0
        if response.status == 206:
            total = int(response.headers.get("Content-Range", "/0").rsplit("/", 1)[1])
        else:
            total = int(response.headers.get("Content-Length", 0))
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total or None, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
                disable=not progress) as bar:
            while block := response.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
    size = part.stat().st_size
    if total and size != total:
        raise OSError(f"connection closed after {size} of {total} bytes")


def download_file(url: str, dest: Path, *, retries: int = 5, progress: bool = True, timeout: float = 60.0,
                  sha256: str | None = None) -> Path:
    """Fetch `url` to `dest` via `dest.part`, resuming and retrying; check the hash, then rename."""
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, progress, timeout)
            break
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise UserError(f"{url}: HTTP {e.code} {e.reason}; check the model size and --base_url") from None
            error = e
        except (OSError, urllib.error.URLError) as e:
            error = e
        if attempt == retries:
            raise UserError(f"{url}: download failed after {retries + 1} attempts ({error}); run the same "
                            f"command again to resume from {part}") from None
        time.sleep(min(0.5 * 2 ** attempt, 10.0))
    if sha256 is not None and (digest := _sha256(part)) != sha256:
        part.unlink()
        raise UserError(f"{url}: sha256 {digest} does not match the expected {sha256}; the partial file "
                        "was removed, run the command again")
    os.replace(part, dest)
    return dest


def _complete(path: storage.AnyPath, name: str) -> bool:
    """Whether a release file is already there (and, where its hash is known, has it)."""
    return path.exists() and (name not in SHA256 or _sha256(path) == SHA256[name])


def _staging_dir(out: storage.AnyPath) -> Path:
    """The local directory a download into the URL `out` goes through: one per destination, so that running
    the command again resumes it."""
    return Path(tempfile.gettempdir()) / "gpt2_jax_download" / hashlib.sha256(str(out).encode()).hexdigest()[:16]


def download_model(model: str, models_dir: str | os.PathLike = "models", *, base_url: str = DEFAULT_BASE_URL,
                   retries: int = 5, progress: bool = True) -> storage.AnyPath:
    """Download every release file of one size ('124M', '355M', '774M' or '1558M') into models_dir/<size>, a
    local directory or a URL (each file staged locally, then uploaded once verified)."""
    from gpt2_jax.model import PRESETS  # here: the CLI's --help imports this module for its default URL

    if model not in PRESETS:
        raise UserError(f"unknown model size {model!r}; use one of {', '.join(PRESETS)}")
    out = storage.path(models_dir) / model
    into_store = storage.is_url(out)
    staging = _staging_dir(out) if into_store else out
    storage.mkdir(out)
    staging.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        dest, local = out / name, staging / name
        if _complete(dest, name):
            continue
        if not _complete(local, name):
            download_file(f"{base_url.rstrip('/')}/{model}/{name}", local, retries=retries, progress=progress,
                          sha256=SHA256.get(name))
        if into_store:
            try:
                storage.upload(local, dest)
            except (OSError, *storage.store_errors()) as e:
                raise UserError(f"{dest}: the upload failed ({reason(e)}); run the same command again to upload "
                                f"{local}, downloaded and verified") from None
            local.unlink()
    if into_store:
        shutil.rmtree(staging, ignore_errors=True)
    return out
