"""Bulk inference: `hf-vlm caption` and `hf-vlm embed` over whole datasets, in one process or many.

    run_caption("laion/{00000..00999}.tar", "org/blip2-flan-t5-xl", "out/captions")        # captions/*.parquet
    run_embed("laion/{00000..00999}.tar", "org/coca-large-v2", "out/index",                # img_emb/, text_emb/,
              embeddings=("image", "text"))                                               # metadata/

What may be read (`hf_vlm.bulk.run.InputShards`): every source training's `--train_data` and `hf-vlm eval --data`
take, resolved by the same code (`hf_vlm.data.sources.resolve_source`) and read by the same readers in their RAW mode
(`hf_vlm.data.shards`; parquet and Hub datasets through `datasets`), images decoded by the one decoder
(`hf_vlm.data.images.load_rgb_image`), bad samples counted under training's skip reasons.

The unit of work, of output and of resume is the input shard (a webdataset tar, an imagefolder's metadata file, a
parquet file, a Hub dataset's data file): output `i` holds the usable samples of input shard `i` in their order,
written to a temporary name and renamed, then marked done (`progress/`). Rank r of a launch takes shards r, r + W,
... and reads nothing else; a restarted run skips the shards marked done. Modules: `run` (shards, batches, resume,
summary), `tasks` (the models: captions with optional CoCa reranking, embeddings).
"""

from .run import InputShards, run_bulk
from .tasks import CaptionTask, EmbedTask, run_caption, run_embed

__all__ = ["CaptionTask", "EmbedTask", "InputShards", "run_bulk", "run_caption", "run_embed"]
