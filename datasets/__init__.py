"""Text-to-person datasets: parsers (CUHK-PEDES, ICFG-PEDES, RSTPReid, SynthPEDES), torch datasets, loaders."""
from datasets.build import (DATASET_REGISTRY, build_dataloader, build_dataset, build_eval_loaders, build_train_loader,
                            build_transforms, collate, seed_worker, set_train_epoch)

__all__ = ["DATASET_REGISTRY", "build_dataloader", "build_dataset", "build_eval_loaders", "build_train_loader",
           "build_transforms", "collate", "seed_worker", "set_train_epoch"]
