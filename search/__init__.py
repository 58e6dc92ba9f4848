"""Search over a gallery with a trained run, and showing it: ``retrieval.py`` (``Retriever``: encode, rank, cache),
``gallery.py`` (a folder's images, read leniently), ``split_queries.py`` (the test split as queries), ``grid.py`` (result
grids), ``server.py`` (the browser search page, started by ``visualize.py --serve``)."""
