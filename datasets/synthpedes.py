"""SynthPEDES: a small procedural text-to-person dataset for demos and tests (no download).

Pedestrian-like figures drawn with PIL (hair length/colour, upper garment type/colour, lower garment type/colour,
shoes, bag type/colour) on varied backgrounds with pose, scale, position, lighting jitter and flips. An identity is a
distinct attribute combination; every identity gets ``images_per_id`` images and every image two template captions
(synonyms, shuffled clauses). Written in the CUHK-PEDES format::

    <root>/SynthPEDES/
        imgs/{train,val,test}/<id:04d>_<k>.png
        reid_raw.json        [{"split", "id" (1-based), "file_path", "captions", "processed_tokens"}]
        meta.json            generator version + parameters (written last: marks a complete dataset)

Generation is deterministic in (seed, parameters) and happens on first use into a temporary folder that is renamed
into place, so an interrupted run never looks complete. A folder whose meta.json differs (other parameters or
generator version) is regenerated; a SynthPEDES folder without meta.json is an error (it is not ours to replace).
"""
from __future__ import annotations

import json
import logging
import os
import os.path as op
import random
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from datasets.cuhkpedes import CUHKPEDES
from utils.run_dir import read_json

logger = logging.getLogger("IRRA.dataset")

GENERATOR_VERSION = 2  # bump whenever the images or captions change
META_FILE = "meta.json"
ANNO_FILE = "reid_raw.json"
SUPERSAMPLE = 3  # figures are drawn at 3x and downsampled (anti-aliasing)

RGB = Tuple[int, int, int]
# Strong, mutually distinct garment colours (name -> RGB).
GARMENT_COLOURS: Dict[str, RGB] = {
    "red": (215, 25, 30), "orange": (255, 135, 0), "yellow": (245, 215, 10), "green": (20, 155, 45),
    "blue": (25, 65, 225), "purple": (125, 35, 175), "pink": (255, 110, 190), "white": (245, 245, 245),
    "black": (22, 22, 22), "gray": (128, 128, 128),
}
LOWER_COLOURS = ("black", "blue", "gray", "white", "red", "green", "brown", "yellow")
EXTRA_COLOURS: Dict[str, RGB] = {"brown": (115, 65, 25)}
HAIR_COLOURS: Dict[str, RGB] = {"black": (15, 12, 10), "brown": (110, 60, 20), "blonde": (240, 205, 90),
                                "gray": (165, 165, 165)}
SHOE_COLOURS = ("black", "white", "red", "brown")
BAG_COLOURS = ("black", "red", "blue", "yellow", "green")
UPPER_TYPES = ("tshirt", "jacket", "coat")
LOWER_TYPES = ("pants", "shorts", "skirt")
HAIR_LENGTHS = ("short", "long")
BAG_TYPES = ("none", "backpack", "handbag")
SKIN_TONES: Tuple[RGB, ...] = ((245, 205, 170), (225, 175, 135), (190, 135, 95), (140, 95, 60), (95, 65, 40))
# Muted backgrounds (streets, walls, floors): low saturation so garments stand out.
BACKGROUNDS: Tuple[RGB, ...] = ((150, 155, 160), (175, 165, 145), (120, 130, 118), (185, 182, 172), (95, 105, 120),
                                (160, 140, 125), (135, 145, 150), (110, 100, 95), (200, 195, 185), (140, 150, 130))

# Caption vocabulary (synonyms).
SUBJECTS = ("A person", "A pedestrian", "This person", "The pedestrian", "An individual", "The person")
PRONOUNS = ("The person", "This pedestrian", "The individual", "This person")
WEAR = ("is wearing", "wears", "is dressed in", "has on")
UPPER_NOUNS = {"tshirt": ("t-shirt", "short-sleeved shirt", "short-sleeved top", "tee"),
               "jacket": ("jacket", "long-sleeved jacket", "zip-up jacket"),
               "coat": ("long coat", "knee-length coat", "coat")}
LOWER_NOUNS = {"pants": ("pants", "trousers", "long pants"), "shorts": ("shorts", "short pants"),
               "skirt": ("skirt", "knee-length skirt")}
SHOE_NOUNS = ("shoes", "sneakers", "footwear")
BAG_NOUNS = {"backpack": ("backpack", "rucksack", "backpack on the back"),
             "handbag": ("handbag", "shoulder bag", "bag over the shoulder")}
COLOUR_WORDS = {"gray": ("gray", "grey"), "purple": ("purple", "violet")}


def _colour(name: str) -> RGB:
    return GARMENT_COLOURS.get(name) or EXTRA_COLOURS[name]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def num_identities() -> int:
    """How many distinct identities (attribute combinations) exist; upper and lower colours always differ."""
    colour_pairs = sum(1 for uc in GARMENT_COLOURS for lc in LOWER_COLOURS if uc != lc)
    bags = 1 + (len(BAG_TYPES) - 1) * len(BAG_COLOURS)
    return (len(HAIR_LENGTHS) * len(HAIR_COLOURS) * len(UPPER_TYPES) * len(LOWER_TYPES) * colour_pairs
            * len(SHOE_COLOURS) * bags)


def sample_identities(n: int, rng: random.Random) -> List[dict]:
    """``n`` distinct identities; attributes spread evenly by drawing per-attribute values, rejecting repeats."""
    seen, out = set(), []
    while len(out) < n:
        bag = rng.choice(BAG_TYPES)
        upper_colour = rng.choice(list(GARMENT_COLOURS))
        lower_colour = rng.choice([c for c in LOWER_COLOURS if c != upper_colour])
        ident = dict(hair_length=rng.choice(HAIR_LENGTHS), hair_colour=rng.choice(list(HAIR_COLOURS)),
                     upper=rng.choice(UPPER_TYPES), upper_colour=upper_colour, lower=rng.choice(LOWER_TYPES),
                     lower_colour=lower_colour, shoes=rng.choice(SHOE_COLOURS), bag=bag,
                     bag_colour=rng.choice(BAG_COLOURS) if bag != "none" else "none")
        key = tuple(sorted(ident.items()))
        if key not in seen:
            seen.add(key)
            out.append(ident)
    return out


# ---------------------------------------------------------------------------------------------------- captions
def make_caption(ident: dict, rng: random.Random) -> str:
    """One template caption describing ``ident`` (random synonyms and clause order)."""
    def cw(name: str) -> str:
        return rng.choice(COLOUR_WORDS.get(name, (name,)))

    hair = f"{ident['hair_length']} {cw(ident['hair_colour'])} hair"
    upper_w = f"{cw(ident['upper_colour'])} {rng.choice(UPPER_NOUNS[ident['upper']])}"
    upper = f"{_article(upper_w)} {upper_w}"
    lower_n = rng.choice(LOWER_NOUNS[ident["lower"]])
    lower_w = f"{cw(ident['lower_colour'])} {lower_n}"
    lower = f"{_article(lower_w)} {lower_w}" if ident["lower"] == "skirt" else lower_w
    shoes = f"{cw(ident['shoes'])} {rng.choice(SHOE_NOUNS)}"

    extras = []  # independent sentences, shuffled
    hair_in_subject = rng.random() < 0.5
    if not hair_in_subject:
        extras.append(f"{rng.choice(PRONOUNS)} has {hair}.")
    extras.append(rng.choice((f"{rng.choice(PRONOUNS)} {rng.choice(('wears', 'is wearing'))} {shoes}.",
                              f"On the feet are {shoes}.")))
    if ident["bag"] != "none":
        bag_w = f"{cw(ident['bag_colour'])} {rng.choice(BAG_NOUNS[ident['bag']])}"
        extras.append(f"{rng.choice(PRONOUNS)} {rng.choice(('is carrying', 'carries', 'has'))} "
                      f"{_article(bag_w)} {bag_w}.")
    elif rng.random() < 0.3:
        extras.append(f"{rng.choice(PRONOUNS)} carries no bag.")
    rng.shuffle(extras)

    outfit_last = rng.random() < 0.3  # sometimes the outfit sentence comes last
    subject = rng.choice(PRONOUNS if outfit_last else SUBJECTS)
    if hair_in_subject:
        subject += f" with {hair}"
    if rng.random() < 0.5:
        outfit = f"{subject} {rng.choice(WEAR)} {upper} and {lower}."
    else:  # lower garment first
        outfit = f"{subject} {rng.choice(WEAR)} {lower} with {upper}."
    return " ".join(extras + [outfit] if outfit_last else [outfit] + extras)


# ---------------------------------------------------------------------------------------------------- drawing
def _jitter(c: RGB, f: float) -> RGB:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)


def _limb(draw: ImageDraw.ImageDraw, p0: Tuple[float, float], p1: Tuple[float, float], width: float, fill: RGB) -> None:
    draw.line([p0, p1], fill=fill, width=max(1, int(round(width))))
    r = width / 2
    for (x, y) in (p0, p1):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


def _point(p0: Tuple[float, float], length: float, angle_deg: float) -> Tuple[float, float]:
    a = np.deg2rad(angle_deg)
    return p0[0] + length * float(np.sin(a)), p0[1] + length * float(np.cos(a))


def _background(h: int, w: int, rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    base = np.array(rng.choice(BACKGROUNDS), dtype=np.float32)
    top = base * rng.uniform(0.85, 1.15)
    ground = np.array(rng.choice(BACKGROUNDS), dtype=np.float32) * rng.uniform(0.7, 1.0)
    horizon = int(h * rng.uniform(0.7, 0.85))
    img = np.empty((h, w, 3), dtype=np.float32)  # HWC
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None]  # [horizon] -> [horizon, 1]
    # vertical gradient [horizon, 3] -> [horizon, 1, 3], broadcast over the width
    img[:horizon] = (top[None, :] * (1 - t) + base[None, :] * t)[:, None, :]
    img[horizon:] = ground
    for _ in range(rng.randint(1, 4)):  # buildings / windows / poles
        x0, y0 = rng.randint(0, w - 1), rng.randint(0, horizon - 1)
        x1, y1 = min(w, x0 + rng.randint(3, w // 2)), min(horizon, y0 + rng.randint(4, h // 3))
        img[y0:y1, x0:x1] = np.array(rng.choice(BACKGROUNDS), dtype=np.float32) * rng.uniform(0.7, 1.1)
    img += nrng.normal(0.0, rng.uniform(2.0, 8.0), size=img.shape).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def render_person(ident: dict, h: int, w: int, rng: random.Random) -> Image.Image:
    """Draw one image (RGB, ``h`` x ``w``) of identity ``ident`` with pose / scale / background jitter."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    bg = _background(h, w, rng, nrng)
    S = SUPERSAMPLE
    H, W = h * S, w * S
    fig = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(fig)
    light = rng.uniform(0.85, 1.1)
    col = lambda name: _jitter(_colour(name), light)  # noqa: E731
    skin = _jitter(rng.choice(SKIN_TONES), light)
    hair_c = _jitter(HAIR_COLOURS[ident["hair_colour"]], light)

    fh = H * rng.uniform(0.80, 0.93)                 # figure height
    cx = W / 2 + W * rng.uniform(-0.07, 0.07)
    y0 = (H - fh) * rng.uniform(0.2, 0.8)
    u = fh / 100.0                                    # body unit
    head_r = 6.5 * u
    head_c = (cx + rng.uniform(-1, 1) * u, y0 + head_r)
    shoulder_y = y0 + 2 * head_r + 2.5 * u
    waist_y = shoulder_y + 30 * u
    ankle_y = y0 + fh - 4 * u
    half_sh, half_hip = 12 * u * rng.uniform(0.92, 1.05), 9.5 * u
    arm_w, leg_w = 6.0 * u, 7.5 * u
    swing = rng.uniform(-22, 22)
    stride = rng.uniform(-14, 14)

    # long hair behind the head and shoulders
    if ident["hair_length"] == "long":
        d.rounded_rectangle([head_c[0] - head_r * 1.15, head_c[1] - head_r * 0.3,
                             head_c[0] + head_r * 1.15, shoulder_y + 11 * u], radius=head_r * 0.6, fill=hair_c)
    # backpack behind the torso, sticking out on one side
    bag_c = col(ident["bag_colour"]) if ident["bag"] != "none" else None
    side = rng.choice((-1, 1))
    if ident["bag"] == "backpack":
        bx = cx + side * half_sh * 0.75
        d.rounded_rectangle([bx - 9 * u, shoulder_y + 2 * u, bx + 9 * u, shoulder_y + 26 * u], radius=3 * u, fill=bag_c)

    # legs (lower garment covers them fully for pants, to the knee for shorts, skirt drawn over)
    hip_l, hip_r = (cx - half_hip * 0.55, waist_y), (cx + half_hip * 0.55, waist_y)
    leg_len = ankle_y - waist_y
    lower_c = col(ident["lower_colour"])
    for hip, ang in ((hip_l, stride), (hip_r, -stride)):
        ankle = _point(hip, leg_len, ang)
        knee = _point(hip, leg_len * 0.5, ang)
        if ident["lower"] == "pants":
            _limb(d, hip, ankle, leg_w, lower_c)
        else:
            _limb(d, knee, ankle, leg_w * 0.8, skin)
            _limb(d, hip, knee if ident["lower"] == "shorts" else hip, leg_w, lower_c)
        shoe_c = col(ident["shoes"])
        fx = ankle[0] + rng.choice((-1, 1)) * 1.5 * u
        d.ellipse([fx - 5.5 * u, ankle[1] - 2.5 * u, fx + 5.5 * u, ankle[1] + 4 * u], fill=shoe_c)
    if ident["lower"] == "skirt":
        knee_y = waist_y + leg_len * 0.5
        d.polygon([(cx - half_hip, waist_y - 2 * u), (cx + half_hip, waist_y - 2 * u),
                   (cx + half_hip * 1.7, knee_y), (cx - half_hip * 1.7, knee_y)], fill=lower_c)
    elif ident["lower"] == "shorts":
        d.rectangle([cx - half_hip, waist_y - 2 * u, cx + half_hip, waist_y + 6 * u], fill=lower_c)
    else:
        d.rectangle([cx - half_hip, waist_y - 2 * u, cx + half_hip, waist_y + 5 * u], fill=lower_c)

    # torso (coat reaches mid-thigh)
    upper_c = col(ident["upper_colour"])
    torso_bottom = waist_y + (20 * u if ident["upper"] == "coat" else 2 * u)
    bottom_half = half_hip * (1.45 if ident["upper"] == "coat" else 1.05)
    d.polygon([(cx - half_sh, shoulder_y), (cx + half_sh, shoulder_y),
               (cx + bottom_half, torso_bottom), (cx - bottom_half, torso_bottom)], fill=upper_c)
    dark = _jitter(_colour(ident["upper_colour"]), 0.55 if ident["upper_colour"] != "black" else 2.8)
    if ident["upper"] in ("jacket", "coat"):  # zipper / button line
        d.line([(cx, shoulder_y + 2 * u), (cx, torso_bottom)], fill=dark, width=max(1, int(1.6 * u)))
    if ident["upper"] == "coat":
        for k in range(3):
            by = shoulder_y + (8 + 9 * k) * u
            d.ellipse([cx + 2 * u, by - 1.3 * u, cx + 4.6 * u, by + 1.3 * u], fill=dark)
    # arms: sleeves to the elbow for a t-shirt, full length otherwise
    for sgn, ang in ((-1, -abs(swing) * 0.3 + swing), (1, abs(swing) * 0.3 - swing)):
        sh = (cx + sgn * (half_sh - arm_w * 0.35), shoulder_y + arm_w * 0.5)
        ang = ang + sgn * 8
        hand = _point(sh, 31 * u, ang)
        elbow = _point(sh, 15 * u, ang)
        if ident["upper"] == "tshirt":
            _limb(d, elbow, hand, arm_w * 0.8, skin)
            _limb(d, sh, elbow, arm_w * 1.1, upper_c)
        else:
            _limb(d, sh, hand, arm_w, upper_c)
        d.ellipse([hand[0] - 2.6 * u, hand[1] - 2.6 * u, hand[0] + 2.6 * u, hand[1] + 2.6 * u], fill=skin)
        if ident["bag"] == "handbag" and sgn == side:
            strap_top = (cx - sgn * half_sh * 0.6, shoulder_y)
            bag_box = [hand[0] - 6 * u, hand[1] - 4 * u, hand[0] + 6 * u, hand[1] + 8 * u]
            d.line([strap_top, (hand[0], hand[1] - 4 * u)], fill=bag_c, width=max(1, int(1.8 * u)))
            d.rounded_rectangle(bag_box, radius=2 * u, fill=bag_c)
    if ident["bag"] == "backpack":  # straps over the shoulders
        for sgn in (-1, 1):
            x = cx + sgn * half_sh * 0.5
            d.line([(x, shoulder_y), (x + sgn * 1.5 * u, shoulder_y + 20 * u)], fill=bag_c, width=max(1, int(2.4 * u)))

    # neck, head, hair on top
    d.rectangle([cx - 2.5 * u, head_c[1] + head_r * 0.6, cx + 2.5 * u, shoulder_y + u], fill=skin)
    d.ellipse([head_c[0] - head_r, head_c[1] - head_r, head_c[0] + head_r, head_c[1] + head_r], fill=skin)
    d.chord([head_c[0] - head_r * 1.08, head_c[1] - head_r * 1.12, head_c[0] + head_r * 1.08,
             head_c[1] + head_r * (0.9 if ident["hair_length"] == "long" else 0.5)], 180, 360, fill=hair_c)

    fig = fig.resize((w, h), Image.LANCZOS)
    bg.paste(fig, (0, 0), fig)
    if rng.random() < 0.5:
        bg = bg.transpose(Image.FLIP_LEFT_RIGHT)
    return bg


# ---------------------------------------------------------------------------------------------------- generation
def synth_params(num_train_ids: int = 240, num_val_ids: int = 40, num_test_ids: int = 80, images_per_id: int = 4,
                 img_height: int = 128, img_width: int = 64, seed: int = 0) -> dict:
    """Validated generation parameters (these, with the generator version, go into meta.json)."""
    params = dict(num_train_ids=int(num_train_ids), num_val_ids=int(num_val_ids), num_test_ids=int(num_test_ids),
                  images_per_id=int(images_per_id), img_height=int(img_height), img_width=int(img_width),
                  seed=int(seed))
    for k in ("num_train_ids", "num_test_ids", "images_per_id"):
        if params[k] < 1:
            raise ValueError(f"SynthPEDES: {k} must be >= 1, got {params[k]}")
    if params["num_val_ids"] < 0:
        raise ValueError(f"SynthPEDES: num_val_ids must be >= 0, got {params['num_val_ids']}")
    if params["img_height"] < 32 or params["img_width"] < 16:
        raise ValueError(f"SynthPEDES: images must be at least 32x16 (HxW), got "
                         f"{params['img_height']}x{params['img_width']}")
    n = params["num_train_ids"] + params["num_val_ids"] + params["num_test_ids"]
    if n > num_identities() // 2:
        raise ValueError(f"SynthPEDES: {n} identities requested; at most {num_identities() // 2} "
                         f"(half of the {num_identities()} attribute combinations) are supported")
    return params


def _write_dataset(out_dir: str, params: dict, show_progress: bool = True) -> None:
    rng = random.Random(params["seed"])
    n_train, n_val, n_test = params["num_train_ids"], params["num_val_ids"], params["num_test_ids"]
    idents = sample_identities(n_train + n_val + n_test, rng)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    annos = []
    total = len(idents) * params["images_per_id"]
    with tqdm(total=total, desc="Generating SynthPEDES", disable=not show_progress, leave=False) as bar:
        for i, (ident, split) in enumerate(zip(idents, splits)):
            pid = i + 1  # CUHK-PEDES ids are 1-based
            os.makedirs(op.join(out_dir, "imgs", split), exist_ok=True)
            for k in range(params["images_per_id"]):
                img_rng = random.Random(f"{params['seed']}-{pid}-{k}")
                img = render_person(ident, params["img_height"], params["img_width"], img_rng)
                rel = f"{split}/{pid:04d}_{k}.png"
                img.save(op.join(out_dir, "imgs", rel), format="PNG", optimize=False)
                caps = [make_caption(ident, img_rng)]
                for _ in range(20):  # a second, different caption
                    c = make_caption(ident, img_rng)
                    if c != caps[0]:
                        break
                caps.append(c)
                annos.append({"split": split, "captions": caps, "file_path": rel, "processed_tokens": [],
                              "id": pid, "attributes": ident})
                bar.update(1)
    with open(op.join(out_dir, ANNO_FILE), "w", encoding="utf-8") as f:
        json.dump(annos, f, indent=1)
    with open(op.join(out_dir, META_FILE), "w", encoding="utf-8") as f:  # last: marks completion
        json.dump({"generator_version": GENERATOR_VERSION, "params": params}, f, indent=1, sort_keys=True)


def _read_meta(dataset_dir: str) -> Optional[dict]:
    try:
        return read_json(op.join(dataset_dir, META_FILE), META_FILE)
    except (OSError, ValueError):
        return None


def ensure_synthpedes(root: str, show_progress: bool = True, **kwargs) -> str:
    """Generate ``<root>/SynthPEDES`` unless a complete one with the same version + parameters exists; returns it."""
    params = synth_params(**kwargs)
    want = {"generator_version": GENERATOR_VERSION, "params": params}
    dataset_dir = op.join(root, SynthPEDES.dataset_dir)
    if _read_meta(dataset_dir) == want:
        return dataset_dir
    if op.exists(dataset_dir) and _read_meta(dataset_dir) is None:
        raise FileExistsError(f"'{dataset_dir}' exists but has no {META_FILE}: it is not a (complete) generated "
                              f"SynthPEDES folder; remove it or choose another --root_dir")
    os.makedirs(root, exist_ok=True)
    logger.info("Generating SynthPEDES into %s (%s)", dataset_dir, params)
    tmp_dir = tempfile.mkdtemp(prefix=".SynthPEDES.tmp-", dir=root)
    try:
        _write_dataset(tmp_dir, params, show_progress)
        if op.exists(dataset_dir):  # an older version / other parameters: replace it
            old = tempfile.mkdtemp(prefix=".SynthPEDES.old-", dir=root)
            os.rename(dataset_dir, op.join(old, "SynthPEDES"))
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp_dir, dataset_dir)
        except OSError:
            if _read_meta(dataset_dir) != want:  # another process won the race with the same data -> fine
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return dataset_dir


class SynthPEDES(CUHKPEDES):
    """The generated demo dataset, parsed as CUHK-PEDES (train pid = id - 1, eval pids = id)."""

    dataset_dir = "SynthPEDES"
    display_name = "SynthPEDES"
    source_url = "datasets/synthpedes.py (generated on first use)"

    def __init__(self, root: str = "", verbose: bool = True, num_train_ids: int = 240, num_val_ids: int = 40,
                 num_test_ids: int = 80, images_per_id: int = 4, img_height: int = 128, img_width: int = 64,
                 seed: int = 0, show_progress: bool = True, anno_file: str = "") -> None:
        ensure_synthpedes(root, show_progress=show_progress, num_train_ids=num_train_ids, num_val_ids=num_val_ids,
                          num_test_ids=num_test_ids, images_per_id=images_per_id, img_height=img_height,
                          img_width=img_width, seed=seed)
        super().__init__(root=root, verbose=verbose, anno_file=anno_file)
