"""Code written against the original IRRA (github.com/anosorae/IRRA) imports unchanged.

ORIGINAL lists every module of the original code base (the entry scripts aside) with the public classes, functions
and tables it defined, less DROPPED (plus ``_download`` and ``__factory``, which its documentation and its users reach
for); each name must import from the same module and be of the same kind. SIGNATURES holds the original's positional parameters of the functions and
classes called by position, in order: ours must accept them in that order under the same names (extra parameters
after them are ours, with defaults). METHODS are the methods callers use. DROPPED are the names left out on purpose,
with the reason (also in README, "How the code is laid out"); they must stay absent, so that the list is true.
"""
import importlib
import inspect

import pytest

CLASS, FUNCTION, DICT = "class", "function", "dict"

ORIGINAL = {
    "model": {"build_model": FUNCTION},
    "model.build": {"IRRA": CLASS, "build_model": FUNCTION},
    "model.clip_model": {
        "_MODELS": DICT, "available_models": FUNCTION, "_download": FUNCTION, "Bottleneck": CLASS,
        "AttentionPool2d": CLASS, "ModifiedResNet": CLASS, "LayerNorm": CLASS, "QuickGELU": CLASS,
        "ResidualAttentionBlock": CLASS, "Transformer": CLASS, "VisionTransformer": CLASS, "CLIP": CLASS,
        "resize_pos_embed": FUNCTION, "convert_weights": FUNCTION, "build_CLIP_from_openai_pretrained": FUNCTION,
        # called by the original's CLIP.load_param but never defined there (a NameError for text_length != 77)
        "resize_text_pos_embed": FUNCTION,
    },
    "model.objectives": {"compute_sdm": FUNCTION, "compute_mlm": FUNCTION, "compute_itc": FUNCTION,
                         "compute_id": FUNCTION, "compute_cmpm": FUNCTION},
    "datasets": {"build_dataloader": FUNCTION},
    "datasets.build": {"__factory": DICT, "build_transforms": FUNCTION, "collate": FUNCTION,
                       "build_dataloader": FUNCTION},
    "datasets.bases": {"BaseDataset": CLASS, "tokenize": FUNCTION, "ImageTextDataset": CLASS, "ImageDataset": CLASS,
                       "TextDataset": CLASS, "ImageTextMLMDataset": CLASS},
    "datasets.cuhkpedes": {"CUHKPEDES": CLASS},
    "datasets.icfgpedes": {"ICFGPEDES": CLASS},
    "datasets.rstpreid": {"RSTPReid": CLASS},
    "datasets.sampler": {"RandomIdentitySampler": CLASS},
    "datasets.sampler_ddp": {"RandomIdentitySampler_DDP": CLASS},
    "solver": {"build_optimizer": FUNCTION, "build_lr_scheduler": FUNCTION},
    "solver.build": {"build_optimizer": FUNCTION, "build_lr_scheduler": FUNCTION},
    "solver.lr_scheduler": {"LRSchedulerWithWarmup": CLASS},
    "processor.processor": {"do_train": FUNCTION, "do_inference": FUNCTION},
    "utils.checkpoint": {"Checkpointer": CLASS, "strip_prefix_if_present": FUNCTION, "load_state_dict": FUNCTION,
                         "check_key": FUNCTION},
    "utils.metrics": {"rank": FUNCTION, "Evaluator": CLASS},
    "utils.options": {"get_args": FUNCTION},
    "utils.iotools": {"read_image": FUNCTION, "mkdir_if_missing": FUNCTION, "check_isfile": FUNCTION,
                      "read_json": FUNCTION, "write_json": FUNCTION, "save_train_configs": FUNCTION,
                      "load_train_configs": FUNCTION},
    "utils.logger": {"setup_logger": FUNCTION},
    "utils.meter": {"AverageMeter": CLASS},
    "utils.comm": {"get_world_size": FUNCTION, "get_rank": FUNCTION, "is_main_process": FUNCTION,
                   "synchronize": FUNCTION, "all_gather": FUNCTION, "reduce_dict": FUNCTION},
    "utils.simple_tokenizer": {"default_bpe": FUNCTION, "bytes_to_unicode": FUNCTION, "get_pairs": FUNCTION,
                               "basic_clean": FUNCTION, "whitespace_clean": FUNCTION, "SimpleTokenizer": CLASS},
}

# The original's positional parameters, in order ("module.name": "p1 p2 ...").
SIGNATURES = {
    "model.build.build_model": "args num_classes",
    "model.build.IRRA": "args num_classes",
    "model.clip_model.build_CLIP_from_openai_pretrained": "name image_size stride_size jit download_root",
    "model.clip_model.resize_pos_embed": "posemb posemb_new hight width",
    "model.clip_model.convert_weights": "model",
    "model.clip_model._download": "url root",
    "model.clip_model.CLIP": "embed_dim image_resolution vision_layers vision_width vision_patch_size stride_size "
                             "context_length vocab_size transformer_width transformer_heads transformer_layers",
    "model.clip_model.VisionTransformer": "input_resolution patch_size stride_size width layers heads output_dim",
    "model.clip_model.ModifiedResNet": "layers output_dim heads input_resolution width",
    "model.clip_model.Transformer": "width layers heads attn_mask",
    "model.clip_model.ResidualAttentionBlock": "d_model n_head attn_mask",
    "model.clip_model.AttentionPool2d": "spacial_dim embed_dim num_heads output_dim",
    "model.clip_model.Bottleneck": "inplanes planes stride",
    "model.objectives.compute_sdm": "image_fetures text_fetures pid logit_scale image_id factor epsilon",
    "model.objectives.compute_mlm": "scores labels",
    "model.objectives.compute_itc": "image_features text_features logit_scale",
    "model.objectives.compute_id": "image_logits text_logits labels",
    "model.objectives.compute_cmpm": "image_embeddings text_embeddings labels epsilon",
    "datasets.build.build_transforms": "img_size aug is_train",
    "datasets.build.collate": "batch",
    "datasets.build.build_dataloader": "args tranforms",
    "datasets.bases.tokenize": "caption tokenizer text_length truncate",
    "datasets.bases.ImageTextDataset": "dataset transform text_length truncate",
    "datasets.bases.ImageTextMLMDataset": "dataset transform text_length truncate",
    "datasets.bases.ImageDataset": "image_pids img_paths transform",
    "datasets.bases.TextDataset": "caption_pids captions text_length truncate",
    "datasets.cuhkpedes.CUHKPEDES": "root verbose",
    "datasets.icfgpedes.ICFGPEDES": "root verbose",
    "datasets.rstpreid.RSTPReid": "root verbose",
    "datasets.sampler.RandomIdentitySampler": "data_source batch_size num_instances",
    "datasets.sampler_ddp.RandomIdentitySampler_DDP": "data_source batch_size num_instances",
    "solver.build.build_optimizer": "args model",
    "solver.build.build_lr_scheduler": "args optimizer",
    "solver.lr_scheduler.LRSchedulerWithWarmup": "optimizer milestones gamma mode warmup_factor warmup_epochs "
                                                 "warmup_method total_epochs target_lr power last_epoch",
    "processor.processor.do_train": "start_epoch args model train_loader evaluator optimizer scheduler checkpointer",
    "processor.processor.do_inference": "model test_img_loader test_txt_loader",
    "utils.checkpoint.Checkpointer": "model optimizer scheduler save_dir save_to_disk logger",
    "utils.checkpoint.strip_prefix_if_present": "state_dict prefix",
    "utils.checkpoint.load_state_dict": "model loaded_state_dict except_keys",
    "utils.metrics.rank": "similarity q_pids g_pids max_rank get_mAP",
    "utils.metrics.Evaluator": "img_loader txt_loader",
    "utils.iotools.read_image": "img_path",
    "utils.iotools.mkdir_if_missing": "directory",
    "utils.iotools.check_isfile": "path",
    "utils.iotools.read_json": "fpath",
    "utils.iotools.write_json": "obj fpath",
    "utils.iotools.save_train_configs": "path args",
    "utils.iotools.load_train_configs": "path",
    "utils.logger.setup_logger": "name save_dir if_train distributed_rank",
    "utils.comm.all_gather": "data",
    "utils.comm.reduce_dict": "input_dict average",
    "utils.simple_tokenizer.get_pairs": "word",
    "utils.simple_tokenizer.basic_clean": "text",
    "utils.simple_tokenizer.whitespace_clean": "text",
    "utils.simple_tokenizer.SimpleTokenizer": "bpe_path",
}

# Parameters renamed on purpose: {"module.name": {original: ours}} (same position; only keyword callers notice).
RENAMED_PARAMETERS = {
    "model.objectives.compute_sdm": {"image_fetures": "image_features", "text_fetures": "text_features"},  # typo
}

# Known differences, reported and not fixed yet: their signature test is an expected failure, and
# test_known_signature_differences_are_still_there fails once one is fixed, so that its entry is removed.

METHODS = {
    "model.build.IRRA": ("_set_task", "cross_former", "encode_image", "encode_text", "forward"),
    "model.clip_model.CLIP": ("initialize_parameters", "build_attention_mask", "dtype", "encode_image", "encode_text",
                              "forward", "load_param"),
    "model.clip_model.VisionTransformer": ("forward",),
    "model.clip_model.ModifiedResNet": ("_make_layer", "forward"),
    "datasets.bases.BaseDataset": ("show_dataset_info",),
    "solver.lr_scheduler.LRSchedulerWithWarmup": ("get_lr", "step", "state_dict", "load_state_dict"),
    "utils.checkpoint.Checkpointer": ("save", "load", "resume"),
    "utils.metrics.Evaluator": ("eval", "_compute_embedding"),
    "utils.meter.AverageMeter": ("reset", "update"),
    "utils.simple_tokenizer.SimpleTokenizer": ("bpe", "encode", "decode"),
}

DROPPED = {
    "utils.checkpoint.align_and_update_state_dicts": "its suffix matching of keys is replaced by exact keys; missing, "
                                                     "unexpected and mis-shaped keys are errors naming them",
    "utils.iotools.get_text_embedding": "an unused stub in the original (unpickles a file, returns nothing)",
    "datasets.sampler_ddp.all_gather": "one all_gather for the project: utils.comm.all_gather",
    "datasets.sampler_ddp.shared_random_seed": "the ranks derive the same order from (seed, epoch), no communication",
}


def _get(path: str):
    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module,name,kind",
                         [(m, n, k) for m, names in ORIGINAL.items() for n, k in names.items()],
                         ids=[f"{m}.{n}" for m, names in ORIGINAL.items() for n in names])
def test_original_name_imports_from_its_module(module, name, kind):
    obj = getattr(importlib.import_module(module), name)  # AttributeError names the missing one
    if kind == CLASS:
        assert inspect.isclass(obj), f"{module}.{name} is not a class"
    elif kind == FUNCTION:
        assert callable(obj) and not inspect.isclass(obj), f"{module}.{name} is not a function"
    else:
        assert isinstance(obj, dict) and obj, f"{module}.{name} is not a non-empty dict"


@pytest.mark.parametrize("path", sorted(SIGNATURES))
def test_original_positional_parameters_are_accepted_in_order(path):
    renamed = RENAMED_PARAMETERS.get(path, {})
    want = [renamed.get(p, p) for p in SIGNATURES[path].split()]
    params = list(inspect.signature(_get(path)).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert positional[:len(want)] == want, f"{path}: the original's {want}, here {positional}"
    extra = [p for p in params[len(want):] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                         p.KEYWORD_ONLY)]
    assert all(p.default is not p.empty for p in extra), f"{path}: a parameter added after the original's has no default"


@pytest.mark.parametrize("path", sorted(METHODS))
def test_original_methods_exist(path):
    cls = _get(path)
    missing = [m for m in METHODS[path] if not hasattr(cls, m)]
    assert not missing, f"{path} lacks {missing}"


@pytest.mark.parametrize("path", sorted(DROPPED))
def test_dropped_names_are_absent(path):
    module, name = path.rsplit(".", 1)
    assert not hasattr(importlib.import_module(module), name), \
        f"{path} exists again: remove it from DROPPED here and in README"


def test_original_factory_maps_the_original_names_to_their_parsers():
    from datasets import build
    from datasets.cuhkpedes import CUHKPEDES
    from datasets.icfgpedes import ICFGPEDES
    from datasets.rstpreid import RSTPReid

    factory = getattr(build, "__factory")
    assert {k: factory[k] for k in ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")} == \
        {"CUHK-PEDES": CUHKPEDES, "ICFG-PEDES": ICFGPEDES, "RSTPReid": RSTPReid}


def test_re_exports_are_the_same_objects():
    """A name importable from two places is one object (e.g. the seed's datasets/bases.py:tokenize)."""
    import datasets
    import model
    import processor
    import solver
    from datasets import bases, build
    from model import build as model_build
    from processor import processor as proc
    from solver import build as solver_build
    from utils import simple_tokenizer

    assert bases.tokenize is simple_tokenizer.tokenize
    assert datasets.build_dataloader is build.build_dataloader
    assert model.build_model is model_build.build_model
    assert (solver.build_optimizer, solver.build_lr_scheduler) == (solver_build.build_optimizer,
                                                                   solver_build.build_lr_scheduler)
    assert (processor.do_train, processor.do_inference) == (proc.do_train, proc.do_inference)
