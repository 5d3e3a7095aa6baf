"""Writing output files safely, and the integrity record of exported modules.

Outputs (exported ``.so``, CLI ``.npy``) are written all-or-nothing: into a temporary file next to
the target, then renamed over it. A symlink is followed (its target is replaced, the link kept);
a character device or FIFO (``/dev/null``, a pipe) is written through, never replaced by a
regular file; a directory is refused. The result gets the permissions a plain ``open()`` would
give: the mode of the file it replaces, else 0666 (0777 for a library) less the umask.

An exported module ends with an integrity record (DESIGN.md section 9)::

    <shared library, N bytes> <JSON {"format": 1, "library_bytes": N, "library_sha256": hex}>
    <MAGIC, 8 bytes> <length of the JSON, uint64 little-endian>

The dynamic loader ignores bytes after the ELF image, so the file still loads as a plain
library. ``verify_module`` checks the record before anything maps or runs the library: a
truncated copy or a flipped bit becomes a ``ModelLoadError`` instead of SIGBUS or a silently
wrong result. ``runner/psb_runner.cc`` checks the same record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import stat
import struct
import sys
import tempfile

from .errors import ModelLoadError, OutputError

MAGIC = b"PSBTVM\x00\x01"
FOOTER = struct.Struct("<8sQ")  # magic, JSON length
RECORD_FORMAT = 1
_MAX_RECORD = 1 << 16  # the JSON is ~120 bytes; anything longer is not a record


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_output(path) -> tuple[str, str]:
    """``(real path, kind)`` of an output path: kind "new", "file" (an existing regular file) or
    "stream" (a character device or FIFO, written through). Raises ``OutputError`` for a missing
    directory, a directory, or another non-regular file (block device, socket)."""
    path = os.fspath(path)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        directory = os.path.dirname(real)
        if not os.path.isdir(directory):
            raise OutputError(f"cannot write {path}: directory {directory} does not exist") from None
        return real, "new"
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    if stat.S_ISREG(st.st_mode):
        return real, "file"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return real, "stream"
    what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
    raise OutputError(f"cannot write {path}: it is {what}")


def write_output(path, write, suffix: str = "", executable: bool = False) -> str:
    """Write ``path`` all-or-nothing: ``write(tmp_path)`` fills a temporary file, which then
    replaces the target (see the module docstring for links, devices and permissions). Returns
    the path as given. Nothing is left behind when ``write`` raises."""
    return write_outputs([(path, write)], suffix, executable)[0]


def write_text(path, text: str) -> str:
    """``write_output`` of a text file (reports: eval.json, eval.md, diagnosis files)."""
    return write_output(path, lambda tmp: pathlib.Path(tmp).write_text(text), suffix=".tmp")


def write_outputs(items, suffix: str = "", executable: bool = False) -> list:
    """``write_output`` for several ``(path, write)`` at once: every target is checked and every
    temporary file written before the first one replaces its target."""
    targets = [(os.fspath(path), *resolve_output(path)) for path, _ in items]
    temps = []
    try:
        for (path, real, kind), (_, write) in zip(targets, items):
            try:
                fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=".psb_tmp_",
                                           dir=os.path.dirname(real) if kind != "stream" else None)
            except OSError as err:
                raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
            os.close(fd)
            temps.append(tmp)
            write(tmp)
        for (path, real, kind), tmp in zip(targets, temps):
            try:
                if kind == "stream":
                    with open(tmp, "rb") as src, open(real, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    continue
                mode = stat.S_IMODE(os.stat(real).st_mode) if kind == "file" else (0o777 if executable else 0o666) & ~_umask()
                os.chmod(tmp, mode)
                os.replace(tmp, real)
            except OSError as err:
                raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [path for path, _, _ in targets]


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger, what: str):
    """Send what native code writes to file descriptor 2 meanwhile to ``logger`` (debug level; the
    lines are re-printed to stderr if the block raises) instead of the terminal. TVM 0.27 prints
    one ``executable.cc:276: Warning: Scope Saving:`` line per constant when it exports a module
    (20 for the digits demo): noise to a user, which ``logging.getLogger("psb_tvm")`` shows when
    asked. The descriptor is process-wide: other threads' stderr output meanwhile goes there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            for line in text.splitlines():
                logger.debug("%s (native stderr): %s", what, line)
            if failed and text:
                sys.stderr.write(text)


# ---------------------------------------------------------------------------- integrity record
def file_sha256(path, size: int | None = None) -> str:
    """SHA-256 (hex) of the file ``path``, or of its first ``size`` bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    left = os.path.getsize(path) if size is None else size
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def append_record(path) -> dict:
    """Append the integrity record (size and SHA-256 of everything before it) to ``path``."""
    size = os.path.getsize(path)
    record = {"format": RECORD_FORMAT, "library_bytes": size, "library_sha256": file_sha256(path, size)}
    text = json.dumps(record, sort_keys=True).encode()
    with open(path, "ab") as f:
        f.write(text + FOOTER.pack(MAGIC, len(text)))
    return record


def read_record(path) -> dict:
    """The integrity record of an exported module; ``ModelLoadError`` when it is missing or
    malformed (a truncated file, or not a module written by ``PSBModule.export_library``)."""
    path = os.fspath(path)
    total = os.path.getsize(path)
    if total < FOOTER.size:
        raise ModelLoadError(f"{path}: {total} bytes, too short to be a psb_tvm module (truncated?)")
    with open(path, "rb") as f:
        f.seek(total - FOOTER.size)
        magic, length = FOOTER.unpack(f.read(FOOTER.size))
        if magic != MAGIC or not 0 < length <= min(_MAX_RECORD, total - FOOTER.size):
            raise ModelLoadError(f"{path}: no psb_tvm integrity record at the end of the file: the file is truncated "
                                 "or damaged, or was not written by PSBModule.export_library (re-export it with this psb_tvm)")
        f.seek(total - FOOTER.size - length)
        try:
            record = json.loads(f.read(length))
        except ValueError:
            record = None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or record.get("library_bytes") != total - FOOTER.size - length
            or not isinstance(record.get("library_sha256"), str)):
        raise ModelLoadError(f"{path}: the integrity record is damaged or does not match the file size (truncated "
                             "or edited file)")
    return record


def verify_module(path) -> dict:
    """Check the size and SHA-256 recorded in an exported module before it is loaded."""
    record = read_record(path)
    if file_sha256(path, record["library_bytes"]) != record["library_sha256"]:
        raise ModelLoadError(f"{os.fspath(path)}: SHA-256 mismatch: the module was damaged or edited after export "
                             "(re-export or copy it again)")
    return record


def cache_root() -> pathlib.Path:
    """Where psb_tvm keeps what it fetches or builds: ``$PSB_TVM_CACHE`` or ``~/.cache/psb_tvm``."""
    root = os.environ.get("PSB_TVM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "psb_tvm")
    return pathlib.Path(root)
