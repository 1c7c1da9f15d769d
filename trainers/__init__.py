"""Training entry points, installed as `hf_vlm.trainers`: pretrain.py, finetune.py, recipes/,
DeepSpeed and accelerate configs. Scripts run as files and as modules."""
