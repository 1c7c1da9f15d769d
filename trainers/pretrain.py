"""Pretraining with the stock transformers Trainer (+ accelerate / DeepSpeed): CoCa and BLIP-2 stages 1-2.

    accelerate launch --config_file trainers/accelerate/multi_gpu.yaml trainers/pretrain.py \\
        --recipe coca-large-v2 --train_data "shards/{00000..09999}.tar@0.7" "sbu/@0.3" --streaming \\
        --max_steps 100000 --output_dir runs/coca
    python -m hf_vlm.trainers.pretrain --recipe coca-tiny --processor TOKENIZER_DIR --train_data data/ ...

Recipes (trainers/recipes/) give the defaults; any TrainingArguments flag overrides them.
See trainers/training.py for the arguments and stages.
"""

import sys

if __package__ in (None, ""):  # run as a file (accelerate launch trainers/X.py): import only through hf_vlm
    import importlib.util
    from pathlib import Path

    # Python put trainers/ first on sys.path; its folders (deepspeed/, accelerate/) must not shadow packages.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if importlib.util.find_spec("hf_vlm") is None:  # not installed: this checkout
        sys.path.insert(0, str(here.parent))

from hf_vlm.trainers.recipes import PRETRAIN_STAGES  # noqa: E402
from hf_vlm.trainers.training import main_for  # noqa: E402

main = main_for(PRETRAIN_STAGES, prog="pretrain.py")

if __name__ == "__main__":
    sys.exit(main())
