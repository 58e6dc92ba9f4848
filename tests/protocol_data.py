"""Generated data for the protocol tests: a tiny set in UFine6926's layout (SynthPEDES pictures, long captions,
non-contiguous ids, image paths relative to the dataset folder), and tiny checkpoints in MLLM4Text-ReID's layout."""
import json
import os
import random
import shutil
import tempfile

from datasets.synthpedes import ANNO_FILE, _write_dataset, make_caption, synth_params

UFINE_ANNO = "UFine6926_Annotations_1024.json"
UFINE_SYNTH = dict(num_train_ids=6, num_val_ids=1, num_test_ids=4, images_per_id=2, img_height=64, img_width=32,
                   seed=5)
ID_STRIDE, ID_BASE = 7, 100  # annotation id = ID_BASE + ID_STRIDE * SynthPEDES id: not contiguous


def long_caption(attributes: dict, rng: random.Random, sentences: int) -> str:
    """``sentences`` template sentences about one identity joined (UFine6926's captions are ~80 words long)."""
    return " ".join(make_caption(attributes, rng) for _ in range(sentences))


def write_ufine6926(root: str, sentences=(2, 4, 9), anno_name: str = UFINE_ANNO, **overrides) -> str:
    """``<root>/UFine6926/{<anno_name>, pics/<split>/*.png}``; each image gets one caption per entry of
    ``sentences`` (that many template sentences: 2 are ~70 tokens, 4 ~140 (beyond 77, within 168), 9 ~300).
    Returns the dataset folder."""
    params = synth_params(**{**UFINE_SYNTH, **overrides})
    out = os.path.join(root, "UFine6926")
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _write_dataset(tmp, params, show_progress=False)
        with open(os.path.join(tmp, ANNO_FILE), encoding="utf-8") as f:
            annos = json.load(f)
        entries = []
        for a in annos:
            rel = "pics/" + a["file_path"]
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            shutil.copyfile(os.path.join(tmp, "imgs", a["file_path"]), os.path.join(out, rel))
            rng = random.Random(rel)
            entries.append({"id": ID_BASE + ID_STRIDE * a["id"], "file_path": rel, "split": a["split"],
                            "captions": [long_caption(a["attributes"], rng, n) for n in sentences]})
    with open(os.path.join(out, anno_name), "w", encoding="utf-8") as f:
        json.dump(entries, f)
    return out
