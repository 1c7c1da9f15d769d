"""coca-tiny: the CoCa stage (contrastive + caption) on the tiny preset; trains on CPU in about a minute.
Needs --processor (a folder with the tokenizer) and --train_data."""

from hf_vlm.trainers.recipes import TINY_TRAINING, Recipe

# The tiny preset has 33 text positions: 32 tokens + the appended CLS (the full model: 76 + 1).
RECIPE = Recipe(name="coca-tiny", stage="coca", model="coca-tiny", training=dict(TINY_TRAINING),
                data={"max_length": 32})
