"""The browser search page of a trained run (``search/server.py``, started by ``visualize.py --serve``)."""
