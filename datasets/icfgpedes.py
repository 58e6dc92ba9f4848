"""ICFG-PEDES (Ding et al., 2021): <root>/ICFG-PEDES/{imgs/, ICFG-PEDES.json (or ICFG_PEDES.json)}; pid = id."""
from __future__ import annotations

from datasets.bases import BaseDataset


class ICFGPEDES(BaseDataset):
    """ICFG-PEDES: 54,522 images of 4,102 ids, one caption each (train 3,102 ids / test 1,000; no val split)."""

    dataset_dir = "ICFG-PEDES"
    display_name = "ICFG-PEDES"
    anno_files = ("ICFG-PEDES.json", "ICFG_PEDES.json")
    path_key = "file_path"
    train_pid_offset = 0
    source_url = "https://github.com/zifyloo/SSAN"
    expected_tree = ("    imgs/\n"
                     "        test/  train/\n"
                     "    ICFG-PEDES.json   (ICFG_PEDES.json is accepted too)\n")
