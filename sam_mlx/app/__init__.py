"""``sam-mlx app``: a local segmentation app (a page in the browser) and its HTTP API, served by sam_mlx.

Needs the ``sam-mlx[app]`` extra (Starlette, uvicorn, websockets). ``server`` serves the page in ``static/`` and
the API; ``engine`` runs the MLX work (decoding on one thread, encoding on another); ``library`` holds the images
and the folders the app may read and write; ``masks`` encodes masks for the wire and cleans them up.
"""
