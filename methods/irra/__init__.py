"""IRRA (Jiang & Ye, CVPR 2023), the default method: ``method.py`` (its parameter groups and checkpoint format; the
network is ``model/build.py:IRRA``, the original's path), ``options.py`` (its loss names; its options are the core
table's, the original's)."""
