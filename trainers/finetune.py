"""Caption and VQA fine-tuning from a checkpoint with the stock transformers Trainer, LAVIS-style defaults
(BLIP-2 caption fine-tuning: lr 1e-5, ViT unfrozen; `--freeze_vision true` keeps it frozen).

    accelerate launch --config_file trainers/accelerate/multi_gpu.yaml trainers/finetune.py \\
        --recipe blip2-flan-t5-xl-caption-coco --model runs/blip2-stage2 --train_data coco/ --output_dir runs/cap
    python -m hf_vlm.trainers.finetune --recipe blip2-tiny-vqa --model runs/tiny --train_data vqa/ ...

VQA data: image + question + answers columns (see hf_vlm.data). See trainers/training.py for the arguments.
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

from hf_vlm.trainers.recipes import FINETUNE_STAGES  # noqa: E402
from hf_vlm.trainers.training import main_for  # noqa: E402

main = main_for(FINETUNE_STAGES, prog="finetune.py")

if __name__ == "__main__":
    sys.exit(main())
