"""The run directory (``logs/<dataset>/<time>_<name>/``): its file names, resolving a run, the careful text reader,
``metrics.jsonl``, ``test_metrics.json`` and the one ``atomic_write`` every writer of the project uses. No torch.

A run directory holds::

    configs.yaml        the resolved options (utils/iotools.py save_train_configs / load_train_configs)
    train_log.txt       the log (utils/logger.py); test.py's in test_log.txt
    metrics.jsonl       one JSON record per evaluation: {"epoch": e, "R1": ..., ...}       (append_metrics)
    best.pth, last.pth  checkpoints (utils/checkpoint.py Checkpointer, written through atomic_write)
    test_metrics.json   test.py's results per checkpoint file name                        (write_test_metrics)
    gallery_cache/      search/retrieval.py's encoded galleries
    vis/                visualize.py's grids
    .lock               held (fcntl.flock) by the one process that trains or resumes in it (run_lock.RunLock)

Every text file of the project (annotations, configs, metrics, caches) is read through :func:`read_text` /
:func:`read_json` / :func:`read_jsonl`: an error names the file and what is wrong (the encoding found, the line,
nesting too deep), as a :class:`FileReadError` (a ``ValueError``).
"""
from __future__ import annotations

import codecs
import json
import logging
import math
import os
import tempfile
from typing import IO, Any, Callable, Dict, List, Optional, Tuple, Union

logger = logging.getLogger("IRRA.run_dir")

# ------------------------------------------------------------------------------------------------------- the layout
CONFIG_FILE = "configs.yaml"
LOG_FILE = "train_log.txt"
TEST_LOG_FILE = "test_log.txt"
METRICS_FILE = "metrics.jsonl"
TEST_METRICS_FILE = "test_metrics.json"
CHECKPOINT_SUFFIX = ".pth"
BEST = "best"
LAST = "last"
BEST_CHECKPOINT = BEST + CHECKPOINT_SUFFIX
LAST_CHECKPOINT = LAST + CHECKPOINT_SUFFIX
CHECKPOINTS = (BEST_CHECKPOINT, LAST_CHECKPOINT)
GALLERY_CACHE_DIR = "gallery_cache"
VIS_DIR = "vis"
# The writer's lock (RunLock): held by the process that trains in the run directory; holds its pid and host.
LOCK_FILE = ".lock"
# Files a run directory holds right after it was made; a setup failure with nothing else written removes it.
SETUP_FILES = (CONFIG_FILE, LOG_FILE, LOCK_FILE)
# A folder holding any of these is a run directory.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, TEST_METRICS_FILE, *CHECKPOINTS)
# Keys a saved configs.yaml carries that describe the run's state, not an option to reuse.
RUN_STATE_KEYS = ("config", "distributed", "training", "resume", "resume_ckpt_file", "local_rank", "stop_epoch",
                  "environment", "noisy_rate_measured")
# Temporary files of atomic_write: ".<name>.<pid>.<random>.tmp" beside the file they replace.
TMP_SUFFIX = ".tmp"


def checkpoint_file(run_dir: str, name: str) -> str:
    """``<run_dir>/<name>.pth`` (``name`` is ``best``, ``last``, ...)."""
    return os.path.join(run_dir, name + CHECKPOINT_SUFFIX)


def is_run_dir(path: str) -> bool:
    """True if ``path`` is a folder holding a run's files (configs.yaml, metrics.jsonl, test_metrics.json, .pth)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


def resolve_run(path: Union[str, os.PathLike], default_file: str = CONFIG_FILE, what: str = "file"
                ) -> Tuple[str, str]:
    """A run directory or a file in it -> ``(run_dir, file)``: a directory gives ``<dir>/<default_file>``, a file
    gives its folder and itself. ``FileNotFoundError`` names what was expected when the file does not exist."""
    path = os.fspath(path)
    if os.path.isdir(path):
        run_dir, fpath = path, os.path.join(path, default_file)
    else:
        run_dir, fpath = os.path.dirname(os.path.abspath(path)), path
    if not os.path.isfile(fpath):
        raise FileNotFoundError(f"{path}: no such {what} (expected a run directory logs/<dataset>/<run>/ holding "
                                f"{default_file}, or a file in it)")
    return run_dir, fpath


def config_file(path: Union[str, os.PathLike]) -> str:
    """A run directory or its ``configs.yaml`` -> the file (FileNotFoundError naming what was expected)."""
    return resolve_run(path, CONFIG_FILE)[1]


# ----------------------------------------------------------------------------------------------- the careful reader
class FileReadError(ValueError):
    """A file that cannot be read as what it should be; the message names the file and what is wrong."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


# Byte order marks of encodings other than UTF-8 (longest first: the UTF-32 LE mark starts with UTF-16 LE's).
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32 LE"), (codecs.BOM_UTF32_BE, "UTF-32 BE"),
               (codecs.BOM_UTF16_LE, "UTF-16 LE"), (codecs.BOM_UTF16_BE, "UTF-16 BE"))


def _guess_encoding(data: bytes) -> str:
    """A name for the encoding of bytes that are not UTF-8 (a hint for the error message)."""
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            return f"{name} (byte order mark {bom.hex(' ').upper()})"
    head = data[:4096]
    if head and head.count(0) * 4 >= len(head):  # every other byte NUL: ASCII text in UTF-16 without a mark
        return "UTF-16 without a byte order mark (NUL bytes between the characters)"
    return "Latin-1 / Windows-1252 or another 8-bit encoding"


def read_bytes(path: Union[str, os.PathLike], what: str = "file") -> bytes:
    """The bytes of ``path``; ``FileNotFoundError`` / ``OSError`` naming the file and ``what`` it should be."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: '{path}'") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a directory, expected the {what}") from None
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot read the {what}: {e.strerror or e}") from e


def decode_text(data: bytes, path: str, what: str = "file") -> str:
    """UTF-8 text of ``data`` (a UTF-8 byte order mark is dropped, as some Windows editors write one). Other
    encodings raise :class:`FileReadError` naming the file, the encoding found and where the first bad byte is."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for bom, name in _OTHER_BOMS:
        if data.startswith(bom):
            raise FileReadError(path, f"the {what} is {_guess_encoding(data)}, expected UTF-8: save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise FileReadError(path, f"the {what} is not UTF-8: byte 0x{data[e.start]:02x} at line {line}, column "
                                  f"{col}; it looks like {_guess_encoding(data)}: save it as UTF-8") from None


def read_text(path: Union[str, os.PathLike], what: str = "file") -> str:
    """Read ``path`` as UTF-8 text (see :func:`decode_text`); every failure names the file."""
    path = os.fspath(path)
    return decode_text(read_bytes(path, what), path, what)


def parse_json(text: str, path: str, what: str = "file") -> Any:
    """``json.loads`` whose errors (malformed, nested too deeply) are :class:`FileReadError` naming ``path``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileReadError(path, f"Malformed JSON in '{path}' (the {what}): {e}") from None
    except RecursionError:
        raise FileReadError(path, f"the {what} is nested too deeply to be read as JSON") from None


def read_json(path: Union[str, os.PathLike], what: str = "JSON file") -> Any:
    """A JSON file (UTF-8, with or without a byte order mark); errors name the file and what is wrong."""
    path = os.fspath(path)
    return parse_json(read_text(path, what), path, what)


_BAD, _CUT = object(), object()  # markers of _jsonl_lines: a line that does not parse, a truncated last line


def _jsonl_lines(path: str, what: str) -> List[Tuple[int, bytes, Any]]:
    """``(line number, raw bytes, record | _BAD | _CUT)`` of every non-blank line of a JSON-lines file."""
    data = read_bytes(path, what)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    raw_lines = data.split(b"\n")
    cut_last = raw_lines[-1].strip() != b""  # the file does not end with a newline
    out: List[Tuple[int, bytes, Any]] = []
    for i, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            rec = _CUT if cut_last and i == len(raw_lines) else _BAD
        out.append((i, raw, rec))
    return out


def read_jsonl(path: Union[str, os.PathLike], what: str = "JSON lines file"
               ) -> Tuple[List[Tuple[int, Any]], List[int]]:
    """The records of a JSON-lines file: ``([(line number, record), ...], [numbers of unreadable lines])``.

    A last line without its newline that does not parse was cut by a kill during the append: it is left out with a
    warning and not counted as bad. Blank lines are skipped; undecodable bytes on a line make that line bad.
    """
    path = os.fspath(path)
    records: List[Tuple[int, Any]] = []
    bad: List[int] = []
    for i, _, rec in _jsonl_lines(path, what):
        if rec is _CUT:
            logger.warning("%s: the last line (%d) is incomplete (cut by an interrupted write): skipped", path, i)
        elif rec is _BAD:
            bad.append(i)
        else:
            records.append((i, rec))
    return records, bad


# --------------------------------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def temp_files(path: str) -> List[str]:
    """The temporary files :func:`atomic_write` made for ``path`` and left (a writer killed mid-write or alive)."""
    directory, base = os.path.split(os.path.abspath(path))
    prefix = f".{base}."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [os.path.join(directory, n) for n in names if n.startswith(prefix) and n.endswith(TMP_SUFFIX)]


def _temp_pid(tmp: str, path: str) -> Optional[int]:
    middle = os.path.basename(tmp)[len(os.path.basename(path)) + 2:-len(TMP_SUFFIX)]
    head = middle.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_temp_files(path: str) -> List[str]:
    """Remove the temporary files of ``path`` whose writer is gone (its pid is not a live process on this machine);
    a live writer's file is never touched. Returns the removed paths."""
    removed = []
    for tmp in temp_files(path):
        pid = _temp_pid(tmp, path)
        if pid is not None and (pid == os.getpid() or _pid_alive(pid)):
            continue
        try:
            os.remove(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


Content = Union[str, bytes, Callable[[IO], Any]]


def atomic_write(path: Union[str, os.PathLike], content: Content, binary: Optional[bool] = None,
                 encoding: str = "utf-8", remove_stale: bool = False) -> str:
    """Write ``path`` all at once: into a temporary file beside it, flushed to disk, then ``os.replace``. A reader
    sees the old file or the new one, never half of one; on any failure (a full disk, an exception in ``content``,
    Ctrl-C) the temporary file is removed and the old file is kept. Returns ``path``.

    Args:
        path: the file to write (its folder must exist).
        content: ``str`` (written as ``encoding``), ``bytes``, or a callable that writes into the open file.
        binary: open the temporary file in binary mode (default: unless ``content`` is a ``str``).
        encoding: of text content.
        remove_stale: first remove temporary files of ``path`` left by writers that are gone.

    The new file gets the mode of a plainly created one (0666 less the umask).
    """
    path = os.fspath(path)
    if binary is None:
        binary = not isinstance(content, str)
    if remove_stale:
        remove_stale_temp_files(path)
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as f:
            if callable(content):
                content(f)
            else:
                f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_json(path: Union[str, os.PathLike], obj: Any, **dump_kwargs: Any) -> str:
    """:func:`atomic_write` of ``obj`` as JSON (``indent=2, sort_keys=True`` unless given) and a final newline."""
    dump_kwargs.setdefault("indent", 2)
    dump_kwargs.setdefault("sort_keys", True)
    return atomic_write(path, json.dumps(obj, **dump_kwargs) + "\n")


def check_writable(folder: str, what: str) -> None:
    """``OSError`` naming ``what`` unless a file can be created in ``folder`` (an existing folder); tried with a
    temporary file that is removed at once."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write_check.", suffix=TMP_SUFFIX, dir=folder)
    except OSError as e:
        raise OSError(e.errno, f"{folder}: cannot write the {what} there ({e.strerror or e})") from None
    os.close(fd)
    os.remove(tmp)


# --------------------------------------------------------------------------------------------------- metrics.jsonl
def finite_number(value: Any) -> Optional[float]:
    """``value`` as a finite float, None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def records_file(name: str) -> str:
    """The file of a method's per-epoch records named ``name`` (a training hook's log, e.g. ``records_file("ccd")``
    = ``ccd.jsonl``), appended and trimmed like ``metrics.jsonl`` (:func:`append_metrics`, :func:`drop_metrics_from`)."""
    if not name or any(c in name for c in "/\\.") or name == METRICS_FILE.split(".")[0]:
        raise ValueError(f"records_file({name!r}): expected a plain name other than 'metrics'")
    return name + ".jsonl"


def append_metrics(run_dir: str, record: Dict[str, Any], name: str = METRICS_FILE) -> None:
    """Append one evaluation record (one JSON line) to ``<run_dir>/metrics.jsonl`` (or another per-epoch JSON lines
    file ``name``, e.g. ``records_file(...)``). A last line cut by an interrupted append is ended first, so the new record
    stays on its own line."""
    path = os.path.join(run_dir, name)
    line = json.dumps(record) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.seek(0, os.SEEK_END)
        f.write(line.encode("utf-8"))


def read_metrics(run_dir: str) -> Tuple[List[dict], List[int]]:
    """The records of ``<run_dir>/metrics.jsonl`` with an epoch and an R1, and the numbers of the other non-blank
    lines (not JSON, or no epoch / R1). A truncated last line is skipped with a warning. No file: ``([], [])``."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return [], []
    lines, bad = read_jsonl(path, METRICS_FILE)
    records = []
    for i, rec in lines:
        if (isinstance(rec, dict) and finite_number(rec.get("epoch")) is not None
                and finite_number(rec.get("R1")) is not None):
            records.append(rec)
        else:
            bad.append(i)
    return records, sorted(bad)


def drop_metrics_from(run_dir: str, epoch: int, name: str = METRICS_FILE) -> None:
    """Remove the records of ``epoch`` and later, and a last line cut by an interrupted append, from
    ``<run_dir>/metrics.jsonl`` (or ``name``): a resumed run evaluates those epochs again. Other lines are kept."""
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        return
    lines = _jsonl_lines(path, name)
    kept = [raw for _, raw, rec in lines if rec is not _CUT and not (
        isinstance(rec, dict) and finite_number(rec.get("epoch")) is not None and rec["epoch"] >= epoch)]
    if len(kept) != len(lines):
        atomic_write(path, b"".join(raw + b"\n" for raw in kept))


# ----------------------------------------------------------------------------------------------- test_metrics.json
def test_metrics_file(checkpoint: str) -> str:
    """The ``test_metrics.json`` beside ``checkpoint``."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint)), TEST_METRICS_FILE)


def test_metrics_key(checkpoint: str, dataset_name: Optional[str] = None, trained_on: Optional[str] = None) -> str:
    """The entry of ``checkpoint``'s result in ``test_metrics.json``: its file name when tested on the dataset it was
    trained on (or unknown), ``<file name>@<dataset_name>`` when tested on another (cross-domain, kept per dataset)."""
    name = os.path.basename(checkpoint)
    return name if dataset_name is None or dataset_name == trained_on else f"{name}@{dataset_name}"


def write_test_metrics(checkpoint: str, metrics: Dict[str, float], epoch: Optional[int], split: str = "test",
                       key: Optional[str] = None, **data: Any) -> str:
    """Record the test metrics of ``checkpoint`` in ``test_metrics.json`` next to it; returns that file's path.

    The file maps a checkpoint's file name to ``{"checkpoint": absolute path, "epoch", "split", **data, **metrics}``,
    so that best.pth and last.pth of one run each keep their entry: the entry of ``checkpoint`` is replaced, the
    others are kept, and the file is replaced atomically. An existing file that is not such a mapping is left as it
    is and a ``ValueError`` names it.

    Args:
        checkpoint: the evaluated checkpoint file.
        metrics: the evaluation's results (``R1``, ``R5``, ``R10``, ``mAP``, ``mINP``, ...), stored as floats.
        epoch: the checkpoint's epoch (its ``"epoch"`` entry), ``None`` when it has none.
        split: the evaluated split.
        key: the entry (default the checkpoint's file name; :func:`test_metrics_key` for cross-domain results).
        data: what else describes the measurement (``dataset_name``, ``root_dir``: the data it was measured on;
            ``trained_on``: the run's dataset).
    """
    checkpoint = os.path.abspath(checkpoint)
    path = test_metrics_file(checkpoint)
    key = key or os.path.basename(checkpoint)
    table = _existing_test_metrics(path, key)
    table[key] = {"checkpoint": checkpoint, "epoch": None if epoch is None else int(epoch),
                                           "split": split, **data, **{k: float(v) for k, v in metrics.items()}}
    atomic_write_json(path, table)
    return path


def _existing_test_metrics(path: str, recording: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        table = read_json(path, TEST_METRICS_FILE)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read it ({e}); left unchanged: move it away to record {recording}") from e
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a mapping of checkpoint file name to metrics, got "
                         f"{type(table).__name__}; left unchanged: move it away to record {recording}")
    return table


def check_test_metrics_writable(checkpoint: str) -> str:
    """Before an evaluation: raise (naming the file) unless :func:`write_test_metrics` will be able to record the
    result of ``checkpoint`` (the file readable as a mapping, or absent, and its folder writable). Returns its path."""
    path = test_metrics_file(checkpoint)
    _existing_test_metrics(path, os.path.basename(checkpoint))
    if os.path.exists(path) and not os.access(path, os.R_OK):
        raise OSError(f"{path}: not readable")
    check_writable(os.path.dirname(path), TEST_METRICS_FILE)
    return path


def read_test_metrics(run_dir: str) -> Dict[str, dict]:
    """``<run_dir>/test_metrics.json`` as ``{checkpoint file name: entry}`` (entries that are not mappings are left
    out). Raises ``FileNotFoundError`` / ``ValueError`` (naming the file) when it is missing or not a mapping."""
    path = os.path.join(run_dir, TEST_METRICS_FILE)
    table = read_json(path, TEST_METRICS_FILE)
    if not isinstance(table, dict):
        raise FileReadError(path, "expected a mapping of checkpoint file name to metrics, got "
                                  f"{type(table).__name__}")
    return {k: v for k, v in table.items() if isinstance(v, dict)}


__all__ = ["CONFIG_FILE", "LOG_FILE", "METRICS_FILE", "TEST_METRICS_FILE", "BEST_CHECKPOINT", "LAST_CHECKPOINT",
           "CHECKPOINTS", "GALLERY_CACHE_DIR", "VIS_DIR", "SETUP_FILES", "RUN_FILES", "RUN_STATE_KEYS",
           "checkpoint_file", "is_run_dir", "resolve_run", "config_file", "FileReadError", "read_text", "read_json",
           "read_jsonl", "atomic_write", "atomic_write_json", "remove_stale_temp_files", "append_metrics",
           "read_metrics", "drop_metrics_from", "write_test_metrics", "check_test_metrics_writable",
           "read_test_metrics", "LOCK_FILE", "records_file"]
