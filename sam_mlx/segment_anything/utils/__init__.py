"""``segment_anything.utils`` on sam_mlx: ``transforms`` (ResizeLongestSide) and ``amg`` (the mask generator's
helpers)."""
