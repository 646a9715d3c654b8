"""Model layers built on mmfast ops (LinFusion, ...)."""
