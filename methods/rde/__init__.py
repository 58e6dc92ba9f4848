"""RDE (Qin et al., CVPR 2024): ``method.py`` (the method), ``model.py`` (the network), ``ccd.py`` (Consensus Clean
Division, its training hook), ``options.py`` (its option group)."""
