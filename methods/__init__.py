"""Methods as plug-ins: one package per method (``methods/<name>/``: ``options.py`` its option group, ``method.py``
its :class:`methods.base.Method`), found through ``methods/registry.py``. Package ``__init__`` files stay empty, so
that reading a method's options imports nothing heavy."""
