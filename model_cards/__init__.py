"""Model card data (package data, read by hf_vlm.hub.cards): one Jinja template per model family
(`*.md`), the family facts (`families.json`: Hub metadata, names of the model's parts, training stages) and the
per-variant facts of the project brief (`variants.json`). Numbers a checkpoint determines are never stored
here: the card computes them."""
