"""RSTPReid (Zhu et al., 2021): <root>/RSTPReid/{imgs/, data_captions.json}; image key 'img_path'; pid = id."""
from __future__ import annotations

from datasets.bases import BaseDataset


class RSTPReid(BaseDataset):
    """RSTPReid: 20,505 images of 4,101 ids, two captions each (train 3,701 ids / val 200 / test 200)."""

    dataset_dir = "RSTPReid"
    display_name = "RSTPReid"
    anno_files = ("data_captions.json",)
    path_key = "img_path"
    train_pid_offset = 0
    source_url = "https://github.com/NjtechCVLab/RSTPReid-Dataset"
    expected_tree = ("    imgs/\n"
                     "        0000_c14_0031.jpg  ...\n"
                     "    data_captions.json\n")
