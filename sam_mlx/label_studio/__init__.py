"""``sam-mlx label-studio``: a Label Studio ML backend served by sam_mlx (docs/label-studio.md).

Needs the ``sam-mlx[app]`` extra (Starlette, uvicorn). ``server`` speaks Label Studio's ML backend protocol;
``backend`` holds the model, the encoded images and the refinement hints; ``config`` reads the labelling config;
``prompts`` reads the user's clicks; ``images`` fetches task images from where Label Studio allows; ``rle`` writes
masks in Label Studio's brush RLE.
"""
