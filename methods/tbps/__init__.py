"""TBPS-CLIP (Cao et al., AAAI 2024, "An Empirical Study of CLIP for Text-based Person Search"; Flame-Chasers/TBPS-CLIP,
commit ba090bc): ``functions.py`` / ``losses.py`` (TBPS's names and signatures, re-exported by ``model/tbps_model.py``),
``model.py``, ``checkpoint.py``, ``data.py``. Empty of imports, as every method package's ``__init__``."""
