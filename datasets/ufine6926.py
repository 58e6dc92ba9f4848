"""UFine6926 (Zuo et al., CVPR 2024, UFineBench): <root>/UFine6926/{UFine6926_Annotations_1024.json, images}.

The layout ICL (``QinYang79/ICL``, ``datasets/ufine.py``) reads: the annotation file is a JSON list of
``{"id", "file_path", "captions", "split"}`` (split train / test / val) and image paths are relative to the
``UFine6926/`` folder itself (no ``imgs/``). ``--anno_file`` names another annotation file (e.g. a re-captioned one).
Train ids are not contiguous there: train pids are the rank of the id among the train ids (0..N-1, in increasing id
order), as the other datasets' pids are contiguous; evaluation splits keep the annotation's ids (only equality
matters there). Its captions are long (80.8 words on average): the recipe (configs/ufine6926.yaml) uses
``--text_length 168``; at 77 tokens most captions are cut. Its protocol adds UFineBench's mSD
(utils/choices.py:DATASET_METRICS).
"""
from __future__ import annotations

from typing import Dict, List

from datasets.annotations import BaseDataset


class UFine6926(BaseDataset):
    """UFine6926: 26,206 images of 6,926 ids with 52,412 captions (ultra-fine-grained, 80.8 words per caption)."""

    dataset_dir = "UFine6926"
    display_name = "UFine6926"
    anno_files = ("UFine6926_Annotations_1024.json",)
    path_key = "file_path"
    image_subdir = ""  # file_path is relative to UFine6926/
    train_pid_offset = 0
    source_url = "https://github.com/Zplusdragon/UFineBench (on request from its authors)"
    expected_tree = ("    UFine6926_Annotations_1024.json   [{\"id\", \"file_path\", \"captions\", \"split\"}, ...]\n"
                     "    <the folders of file_path> ...\n")

    def _process_anno(self, annos: List[dict], training: bool = False):
        if not training:
            return super()._process_anno(annos, training)
        ids = sorted({anno["id"] for anno in annos})
        self.train_id_map: Dict[int, int] = {raw: pid for pid, raw in enumerate(ids)}  # annotation id -> pid
        self._raw_ids = ids
        return super()._process_anno([{**anno, "id": self.train_id_map[anno["id"]]} for anno in annos], training)

    def raw_train_id(self, pid: int) -> int:
        return self._raw_ids[pid]
