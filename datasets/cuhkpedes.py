"""CUHK-PEDES (Li et al., CVPR 2017): <root>/CUHK-PEDES/{imgs/, reid_raw.json}; ids are 1-based (train pid = id - 1)."""
from __future__ import annotations

from datasets.bases import BaseDataset


# Identities of CUHK-PEDES's training split (the full-size id head of the benchmarks).
TRAIN_IDS = 11003


class CUHKPEDES(BaseDataset):
    """CUHK-PEDES: 34,054 images of 13,003 ids with 80,412 captions (train 11,003 ids / val 1,000 / test 1,000)."""

    dataset_dir = "CUHK-PEDES"
    display_name = "CUHK-PEDES"
    anno_files = ("reid_raw.json",)
    path_key = "file_path"
    train_pid_offset = 1  # make pid begin from 0
    source_url = "https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description"
    expected_tree = ("    imgs/\n"
                     "        cam_a/  cam_b/  CUHK01/  CUHK03/  Market/  test_query/  train_query/\n"
                     "    reid_raw.json\n")
