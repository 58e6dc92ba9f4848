"""Annotation parsing: ``BaseDataset`` reads ``<root>/<dataset_dir>/{imgs/, <annotation json>}`` into the splits.

Annotation format (CUHK-PEDES ``reid_raw.json``, ICFG-PEDES ``ICFG-PEDES.json``, RSTPReid ``data_captions.json``):
a json list of entries ``{"split": "train"|"test"|"val", "id": int, <path_key>: str, "captions": [str]}``; any other
split name is an error (the original filed it under val), an id must fit in int64, and the image path must stay
inside ``imgs/`` (relative, no '..' component; a symlink inside imgs/ is followed).

The per-split reid layout (the one TBPS-CLIP's loader reads) is read too, when the dataset folder has none of the
dataset's own annotation files: ``train_reid.json`` and ``test_reid.json`` (required) and ``val_reid.json``
(optional: without it the val split is empty), each a json list of entries ``{"id": int, "file_path": str,
"captions": [str]}`` (``"file_path"`` for every dataset, RSTPReid included, relative to ``imgs/``). A ``"split"`` key is
not needed; one that disagrees with its file is an error. The entries are checked and parsed as above (train pid = id
- ``train_pid_offset``, 0..N-1 without gaps), so a dataset written in both layouts gives the same splits.
An entry may also hold ``"captions_bt": [str]``, the back-translations of its captions (the key TBPS-CLIP reads),
aligned one-to-one: ``captions_bt[j]`` is the back-translation of ``captions[j]``, ``""`` where a caption has none; a
list of another length is a DatasetFormatError naming the entry. Only the train split uses them
(``--txt_aug_backtrans_prob``).

Parsed splits (identical to the original IRRA):
- ``train``: list of ``(pid, image_id, img_path, caption)``, one row per caption; ``image_id`` counts train images in
  file order; pids must be 0..N-1 without gaps.
- ``train_captions_bt``: None when no train entry has ``captions_bt``; else a list aligned with ``train`` holding each
  row's back-translation, or None where the row has none.
- ``test`` / ``val``: dicts ``{"image_pids", "img_paths", "caption_pids", "captions"}`` in file order.

``datasets/bases.py`` re-exports ``BaseDataset`` and ``DatasetFormatError`` (the original's home of BaseDataset).
"""
from __future__ import annotations

import logging
import os.path as op
from typing import Any, Dict, List, Optional, Tuple

from prettytable import PrettyTable

from utils.run_dir import read_json

logger = logging.getLogger("IRRA.dataset")

TrainRow = Tuple[int, int, str, str]
EvalSplit = Dict[str, list]

# The annotation key of the captions' back-translations (TBPS-CLIP's name).
BACKTRANS_KEY = "captions_bt"
# The valid values of an entry's 'split'.
SPLIT_NAMES = ("train", "test", "val")
# The per-split reid layout: one file per split (train and test required, val optional) and its image path key.
SPLIT_FILE_PATTERN = "{split}_reid.json"
SPLIT_FILES_REQUIRED = ("train", "test")
SPLIT_FILE_PATH_KEY = "file_path"
# Identity ids are stored in int64 tensors.
ID_MIN, ID_MAX = -2 ** 63, 2 ** 63 - 1
# How many dropped ids / entries a message names.
MAX_DROPPED_SHOWN = 10


class DatasetFormatError(ValueError):
    """An annotation file holds an entry that cannot be parsed."""


class BaseDataset:
    """Parses ``<root>/<dataset_dir>/{imgs/, <annotation json>}`` into train / test / val.

    Subclasses set the class attributes below; ``__init__`` does the work the original did per dataset.
    """

    logger = logger
    dataset_dir: str = ""                    # folder under root
    anno_files: Tuple[str, ...] = ()        # accepted annotation file names (first that exists wins)
    path_key: str = "file_path"             # entry key holding the image path relative to image_subdir
    image_subdir: str = "imgs/"              # folder of the images under <dataset_dir> ("" = the dataset folder)
    train_pid_offset: int = 0               # train pid = int(id) - train_pid_offset (CUHK-PEDES ids are 1-based)
    source_url: str = ""                    # where to get the data
    expected_tree: str = ""                 # the expected layout under <root>/<dataset_dir>/
    display_name: str = ""

    def __init__(self, root: str = "", verbose: bool = True, anno_file: str = "") -> None:
        """``anno_file`` (``--anno_file``): an annotation file name (under the dataset folder) or path read instead
        of the dataset's own (``anno_files``), e.g. a re-captioned version of the same images; "" = the own."""
        self.root = root
        self.dataset_dir = op.join(root, type(self).dataset_dir)
        self.img_dir = op.join(self.dataset_dir, self.image_subdir)
        if anno_file:
            self.anno_files = (anno_file,)  # op.join keeps an absolute path as it is
        self.anno_paths = self._check_before_run()  # split -> the file that holds it
        self.anno_path = self.anno_paths["train"]    # the file of the train split (named by train-time errors)
        if len(set(self.anno_paths.values())) == 1:  # the dataset's own layout: one file, entries name their split
            annos = self._read_annos(self.anno_path)
        else:                                        # the per-split reid layout
            annos = self._read_split_files(self.anno_paths)
        self.train_annos, self.test_annos, self.val_annos = self._split_anno(annos)
        self.train, self.train_id_container = self._process_anno(self.train_annos, training=True)
        self.train_captions_bt = self._process_backtrans(self.train_annos)
        self.test, self.test_id_container = self._process_anno(self.test_annos)
        self.val, self.val_id_container = self._process_anno(self.val_annos)
        if verbose:
            self.logger.info("=> %s Images and Captions are loaded", self.display_name or type(self).dataset_dir)
            self.show_dataset_info()

    # ------------------------------------------------------------------ parsing
    def _layout_help(self) -> str:
        name = type(self).dataset_dir
        split_files = ", ".join(SPLIT_FILE_PATTERN.format(split=sp) for sp in SPLIT_NAMES)
        return (f"Expected layout for {self.display_name or name}:\n"
                f"  {op.join(self.root, name)}/\n{self.expected_tree}"
                f"  (or the per-split reid layout: imgs/ with {split_files} in place of the annotation file;\n"
                f"   val optional, entries {{\"id\", \"{SPLIT_FILE_PATH_KEY}\", \"captions\"[, "
                f"\"{BACKTRANS_KEY}\"]}})\n"
                f"Get the data from {self.source_url} and point --root_dir at the folder that contains '{name}/'.")

    def _split_file(self, split: str) -> str:
        return op.join(self.dataset_dir, SPLIT_FILE_PATTERN.format(split=split))

    def _check_before_run(self) -> Dict[str, str]:
        """Check the dataset folder, imgs/ and the annotation file(s); return ``{split: annotation path}``.

        The dataset's own annotation file (the first of ``anno_files`` that exists) wins; without one, the per-split
        reid layout (``train_reid.json`` + ``test_reid.json`` [+ ``val_reid.json``])."""
        anno_paths = [op.join(self.dataset_dir, f) for f in self.anno_files]
        problems = []
        found: Dict[str, str] = {}
        if not op.isdir(self.dataset_dir):
            problems.append(f"dataset folder '{self.dataset_dir}' is not available")
        else:
            if not op.isdir(self.img_dir):
                problems.append(f"image folder '{self.img_dir}' is not available")
            own = next((p for p in anno_paths if op.isfile(p)), None)
            given = " (--anno_file)" if self.anno_files != type(self).anno_files else ""
            split_files = {} if given else {sp: self._split_file(sp) for sp in SPLIT_NAMES
                                            if op.isfile(self._split_file(sp))}
            if own is not None:
                found = {sp: own for sp in SPLIT_NAMES}
                if split_files:
                    self.logger.warning("%s: the annotation file '%s' is used; the per-split files %s are ignored",
                                        self.dataset_dir, own, sorted(split_files.values()))
            elif split_files:
                missing = [self._split_file(sp) for sp in SPLIT_FILES_REQUIRED if sp not in split_files]
                if missing:
                    needed = " and ".join(SPLIT_FILE_PATTERN.format(split=sp) for sp in SPLIT_FILES_REQUIRED)
                    problems.append(f"per-split annotation files {sorted(split_files.values())} found, but "
                                    + " and ".join(f"'{p}'" for p in missing)
                                    + f" is not available (the per-split layout needs {needed})")
                found = split_files
            elif given:
                problems.append("annotation file " + " or ".join(f"'{p}'" for p in anno_paths) + given
                                + " is not available")
            else:
                needed = " and ".join(SPLIT_FILE_PATTERN.format(split=sp) for sp in SPLIT_FILES_REQUIRED)
                problems.append("annotation file " + " or ".join(f"'{p}'" for p in anno_paths)
                                + f" is not available (nor the per-split files {needed})")
        if problems:
            raise FileNotFoundError("; ".join(problems) + ".\n" + self._layout_help())
        return found

    def _read_annos(self, anno_path: str) -> List[dict]:
        """Read and validate the annotation list; drop empty / whitespace-only captions (with a warning)."""
        annos, self.dropped_ids = self._clean_annos(read_json(anno_path, "annotation file"), anno_path)
        return annos

    def _read_split_files(self, anno_paths: Dict[str, str]) -> List[dict]:
        """The per-split reid layout: read and validate each split's file (entries as :meth:`_read_annos`, keyed
        ``file_path``, no ``split`` needed); return the entries of all splits, each with its file's split."""
        annos: List[dict] = []
        self.dropped_ids = {}
        for split in SPLIT_NAMES:
            if split not in anno_paths:
                continue
            path = anno_paths[split]
            cleaned, dropped = self._clean_annos(read_json(path, "annotation file"), path,
                                                 path_key=SPLIT_FILE_PATH_KEY, split=split)
            if split == "train":  # the pid-gap message of the train split names its dropped ids
                self.dropped_ids = dropped
            annos.extend(cleaned)
        return annos

    def _clean_annos(self, annos: Any, anno_path: str, path_key: Optional[str] = None,
                     split: Optional[str] = None) -> Tuple[List[dict], Dict[int, List[int]]]:
        """Validate the entries of ``anno_path``; return the kept ones (empty captions dropped, with a warning) and
        the ids left without any entry (``{id: entry indices}``).

        ``path_key``: the entry key of the image path (default ``self.path_key``; the kept entries hold it under
        ``self.path_key``). ``split``: the file holds only this split (the per-split layout): entries need no
        ``split`` key, one that names another split is an error."""
        path_key = path_key or self.path_key
        if not isinstance(annos, list):
            raise DatasetFormatError(f"{anno_path}: expected a JSON list of entries, got {type(annos).__name__}")
        required = (() if split else ("split",)) + ("id", path_key, "captions")
        cleaned, n_dropped, n_entries_dropped = [], 0, 0
        dropped_entries: Dict[int, List[int]] = {}  # id -> indices of its entries dropped for having no caption
        kept_ids: set = set()
        for i, anno in enumerate(annos):
            where = f"{anno_path}: entry {i}"
            if not isinstance(anno, dict):
                raise DatasetFormatError(f"{where}: expected an object, got {type(anno).__name__}")
            for key in required:
                if key not in anno:
                    raise DatasetFormatError(f"{where}: missing key '{key}' (entries need {list(required)})")
            pid = anno["id"]
            if isinstance(pid, bool) or not isinstance(pid, (int, str)) or not _is_int(pid):
                raise DatasetFormatError(f"{where}: key 'id' must be an integer, got {pid!r}")
            if not ID_MIN <= int(pid) <= ID_MAX:
                raise DatasetFormatError(f"{where}: key 'id' is {int(pid)}, outside the 64-bit integer range "
                                         f"[{ID_MIN}, {ID_MAX}] that identity ids are stored in")
            if split is not None and anno.get("split", split) != split:
                raise DatasetFormatError(f"{where}: key 'split' is {anno['split']!r} in the file of the {split!r} "
                                         f"split (the per-split layout: '{SPLIT_FILE_PATTERN.format(split=split)}' "
                                         f"holds only {split!r} entries)")
            if split is None and anno["split"] not in SPLIT_NAMES:
                raise DatasetFormatError(f"{where}: key 'split' is {anno['split']!r}; valid: {list(SPLIT_NAMES)} "
                                         f"(exact, lower case)")
            if not isinstance(anno[path_key], str) or not anno[path_key]:
                raise DatasetFormatError(f"{where}: key '{path_key}' must be a non-empty string, "
                                         f"got {anno[path_key]!r}")
            self._check_image_path(anno[path_key], where, path_key)
            caps = anno["captions"]
            if not isinstance(caps, list) or len(caps) == 0:
                raise DatasetFormatError(f"{where}: key 'captions' must be a non-empty list of strings, got {caps!r}")
            for j, c in enumerate(caps):
                if not isinstance(c, str):
                    raise DatasetFormatError(f"{where}: key 'captions'[{j}] must be a string, got {c!r}")
            bts = self._check_backtrans(anno, where)
            kept = [j for j, c in enumerate(caps) if c.strip()]
            n_dropped += len(caps) - len(kept)
            if not kept:  # an image with no usable caption would add an identity with no training text
                n_entries_dropped += 1
                dropped_entries.setdefault(int(pid), []).append(i)
                continue
            kept_ids.add(int(pid))
            entry = {**anno, "id": int(pid), "captions": [caps[j] for j in kept], self.path_key: anno[path_key]}
            if split is not None:
                entry["split"] = split
            if bts is not None:  # stays aligned with the kept captions
                entry[BACKTRANS_KEY] = [bts[j] for j in kept]
            cleaned.append(entry)
        if n_dropped:
            self.logger.warning("%s: dropped %d empty/whitespace-only captions (%d entries left without any caption "
                                "were dropped too)", anno_path, n_dropped, n_entries_dropped)
        # ids none of whose entries kept a caption: gone from the dataset (named, and named again by the pid check)
        dropped_ids = {pid: idx for pid, idx in dropped_entries.items() if pid not in kept_ids}
        if dropped_ids:
            self.logger.warning("%s: %d ids have no entry with a non-empty caption and were dropped: %s", anno_path,
                                len(dropped_ids), _describe_dropped(dropped_ids))
        return cleaned, dropped_ids

    def _check_image_path(self, path: str, where: str, path_key: Optional[str] = None) -> None:
        """An entry's image path must stay inside ``imgs/``: relative, without a '..' component or a NUL byte.
        (A symlink inside imgs/ is followed: where it points is the user's choice.)"""
        parts = path.replace("\\", "/").split("/")
        if op.isabs(path) or path.startswith(("/", "\\")) or ".." in parts or "\x00" in path:
            raise DatasetFormatError(
                f"{where}: image path {path!r} ('{path_key or self.path_key}') is outside the image folder "
                f"'{self.img_dir}': paths must be relative to imgs/, without '..'")

    @staticmethod
    def _check_backtrans(anno: dict, where: str) -> Optional[List[str]]:
        """The entry's ``captions_bt`` (checked: a list of strings as long as ``captions``), or None without one."""
        if BACKTRANS_KEY not in anno:
            return None
        bts, caps = anno[BACKTRANS_KEY], anno["captions"]
        if not isinstance(bts, list):
            raise DatasetFormatError(f"{where}: key '{BACKTRANS_KEY}' must be a list of strings, got {bts!r}")
        if len(bts) != len(caps):
            raise DatasetFormatError(
                f"{where}: key '{BACKTRANS_KEY}' has {len(bts)} items but 'captions' has {len(caps)}; they must be "
                f"aligned one-to-one ('{BACKTRANS_KEY}'[j] is the back-translation of 'captions'[j], \"\" for none)")
        for j, c in enumerate(bts):
            if not isinstance(c, str):
                raise DatasetFormatError(f"{where}: key '{BACKTRANS_KEY}'[{j}] must be a string, got {c!r}")
        return bts

    def _split_anno(self, annos: List[dict]) -> Tuple[List[dict], List[dict], List[dict]]:
        """split 'train' -> train, 'test' -> test, 'val' -> val (the parser refuses any other name; the original
        filed them under val)."""
        train, test, val = [], [], []
        for anno in annos:
            if anno["split"] == "train":
                train.append(anno)
            elif anno["split"] == "test":
                test.append(anno)
            else:
                val.append(anno)
        return train, test, val

    def _process_anno(self, annos: List[dict], training: bool = False):
        pid_container = set()
        if training:
            dataset: List[TrainRow] = []
            for image_id, anno in enumerate(annos):
                pid = anno["id"] - self.train_pid_offset
                pid_container.add(pid)
                img_path = op.join(self.img_dir, anno[self.path_key])
                for caption in anno["captions"]:
                    dataset.append((pid, image_id, img_path, caption))
            self._check_contiguous_pids(pid_container)
            return dataset, pid_container
        img_paths, captions, image_pids, caption_pids = [], [], [], []
        for anno in annos:
            pid = anno["id"]
            pid_container.add(pid)
            img_paths.append(op.join(self.img_dir, anno[self.path_key]))
            image_pids.append(pid)
            for caption in anno["captions"]:
                captions.append(caption)
                caption_pids.append(pid)
        split = {"image_pids": image_pids, "img_paths": img_paths, "caption_pids": caption_pids, "captions": captions}
        return split, pid_container

    @staticmethod
    def _process_backtrans(annos: List[dict]) -> Optional[List[Optional[str]]]:
        """Back-translations aligned with the train rows of :meth:`_process_anno` (one per caption, in the same
        order): None when no entry has ``captions_bt``; else a list with None where a row has none (blank)."""
        if not any(BACKTRANS_KEY in anno for anno in annos):
            return None
        out: List[Optional[str]] = []
        for anno in annos:
            bts = anno.get(BACKTRANS_KEY) or [""] * len(anno["captions"])
            out.extend(bt if bt.strip() else None for bt in bts)
        return out

    def _check_contiguous_pids(self, pid_container: set) -> None:
        """Train pids index the ID classifier, so they must be exactly 0..N-1."""
        for expected, pid in enumerate(sorted(pid_container)):
            if pid != expected:
                raw, missing = pid + self.train_pid_offset, expected + self.train_pid_offset
                dropped = getattr(self, "dropped_ids", {}).get(missing)
                why = (f"; id {missing} was dropped because every caption of its entries "
                       f"{dropped[:MAX_DROPPED_SHOWN]} is empty" if dropped else "")
                found = (f"id {raw} gives pid {pid} < 0 (ids start at {self.train_pid_offset})" if pid < 0 else
                         f"id {missing} (pid {expected}) is missing, the next id is {raw} (pid {pid}){why}")
                raise DatasetFormatError(
                    f"{self.anno_path}: train pids must be 0..{len(pid_container) - 1} without gaps "
                    f"(pid = id - {self.train_pid_offset}); {found}")

    def raw_train_id(self, pid: int) -> int:
        """The annotation's id of train pid ``pid`` (the inverse of the train pid mapping)."""
        return pid + self.train_pid_offset

    # ------------------------------------------------------------------ info
    def show_dataset_info(self) -> None:
        """Log a table of ids / images / captions per split."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", len(self.train_id_container), len(self.train_annos), len(self.train)])
        table.add_row(["test", len(self.test_id_container), len(self.test["img_paths"]), len(self.test["captions"])])
        table.add_row(["val", len(self.val_id_container), len(self.val["img_paths"]), len(self.val["captions"])])
        self.logger.info("%s statistics:\n%s", type(self).__name__, table)


def _describe_dropped(dropped: Dict[int, List[int]]) -> str:
    items = [f"id {pid} (entries {idx[:MAX_DROPPED_SHOWN]})" for pid, idx in list(dropped.items())[:MAX_DROPPED_SHOWN]]
    more = f" and {len(dropped) - MAX_DROPPED_SHOWN} more" if len(dropped) > MAX_DROPPED_SHOWN else ""
    return ", ".join(items) + more + " (every caption empty or whitespace)"


def _is_int(value: Any) -> bool:
    if isinstance(value, int):
        return True
    try:
        int(value.strip())
        return True
    except ValueError:
        return False
