"""Files in and out: images, image tokens, overlays, atomic writes."""
