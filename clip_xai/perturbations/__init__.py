"""Image perturbations ``(model, pixels, tokens) -> pixels``, all in [0,1] pixel space."""
