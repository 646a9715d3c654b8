"""Model layers built on mmfast ops (LinFusion, Liquid's VQGAN image tokenizer, ...)."""
