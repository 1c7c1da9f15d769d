"""Stage 1 across processes: features are gathered with gradient, so two ranks with half the batch each
compute the same loss and (averaged) gradients as one process with the whole batch; ranks with uneven batches
(an epoch's last batches) train too, and give the full batch's losses and gradients."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForPretraining
from hf_vlm.presets import get_config

WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests_dir!r})
    from test_blip2_distributed import itc_loss_and_gradients
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{{init_file}}", rank=rank, world_size=world)
    loss, grads = itc_loss_and_gradients(rows=slice(2 * rank, 2 * rank + 2))
    dist.all_reduce(loss)
    for g in grads.values():
        dist.all_reduce(g)  # what DDP does, then divides by the world size
    if rank == 0:
        torch.save({{"loss": loss / world, "grads": {{k: g / world for k, g in grads.items()}}}}, out)
    dist.destroy_process_group()
""")

UNEVEN_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests_dir!r})
    from test_blip2_distributed import stage1_losses_and_gradients
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{{init_file}}", rank=rank, world_size=world)
    start, stop, width = {shards!r}[rank]
    losses, grads = stage1_losses_and_gradients(slice(start, stop), width, training={training!r},
                                                weight=(stop - start) / {total})
    for value in [*losses.values(), *grads.values()]:
        dist.all_reduce(value)  # the rank losses are weighted by their share of the global batch
    if rank == 0:
        torch.save({{"losses": losses, "grads": grads}}, out)
    dist.destroy_process_group()
""")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def itc_loss_and_gradients(rows=slice(None)):
    torch.manual_seed(0)
    # eval: no dropout; float64, so that summation order (one process vs two) stays far below the tolerance
    model = Blip2FlanT5ForPretraining(get_config("blip2-tiny")).eval().double()
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    input_ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 3, 0, 0], [2, 11, 12, 3, 0], [2, 13, 14, 15, 3]])
    out = model(pixel_values[rows], input_ids[rows], (input_ids[rows] != 0).long(), return_loss=True)
    out.itc_loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.itc_loss.detach(), grads


TESTS_DIR = str(Path(__file__).parent)


def run_two_ranks(tmp_path, worker_source: str, reference):
    """Run `worker_source` as ranks 0 and 1 of a gloo group while `reference()` computes the one-process result
    here; returns (what the workers saved to the out file, reference())."""
    script = tmp_path / "worker.py"
    script.write_text(worker_source)
    out = tmp_path / "out.pt"
    workers = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", str(tmp_path / "init"), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
        for rank in range(2)
    ]
    expected = reference()
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)
    return torch.load(out), expected


@pytest.mark.distributed
def test_itc_over_two_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    distributed, (reference_loss, reference_grads) = run_two_ranks(
        tmp_path, WORKER.format(tests_dir=TESTS_DIR), itc_loss_and_gradients
    )
    torch.testing.assert_close(distributed["loss"], reference_loss)
    assert distributed["grads"].keys() == reference_grads.keys()
    assert "temp" in reference_grads and "query_tokens" in reference_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-7, atol=1e-12, msg=name)


# Every caption has 3 real tokens after [CLS], so ITG's token mean is also a mean over samples; the last column
# is padding that a rank may not have (its texts are one shorter).
STAGE1_IDS = torch.tensor([[2, 7, 8, 9, 3, 0], [2, 10, 11, 12, 3, 0], [2, 13, 14, 15, 3, 0]])


def stage1_losses_and_gradients(rows=slice(None), width=6, training=False, weight=1.0):
    torch.manual_seed(0)
    no_dropout = {**get_config("blip2-tiny").qformer_config.to_dict(), "hidden_dropout_prob": 0.0,
                  "attention_probs_dropout_prob": 0.0}
    model = Blip2FlanT5ForPretraining(get_config("blip2-tiny", qformer_config=no_dropout)).train(training).double()
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    input_ids = STAGE1_IDS[rows, :width]
    out = model(pixel_values[rows], input_ids, (input_ids != 0).long(), return_loss=True)
    (out.loss * weight).backward()
    losses = {k: (out[k] * weight).detach() for k in ("loss", "itc_loss", "itm_loss", "itg_loss")}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.distributed
@pytest.mark.parametrize(
    "shards, training",
    [
        # 1 + 1: each sample's only ITM negative is on the other rank, so training mode (sampling) is exact too.
        ([(0, 1, 6), (1, 2, 5)], True),
        # 2 + 1, texts padded to different lengths on the two ranks; eval mode takes the hardest negatives.
        ([(0, 2, 5), (2, 3, 6)], False),
    ],
    ids=["1+1-training", "2+1-eval"],
)
def test_ranks_with_uneven_last_batches_train_as_one_process_with_the_whole_batch(tmp_path, shards, training):
    """Uneven per-rank batches (an epoch's last batches) neither crash nor hang: the global batch is gathered with
    each rank's own size, and the losses and gradients (each rank weighted by its share) equal one process's."""
    total = shards[-1][1]
    worker = UNEVEN_WORKER.format(tests_dir=TESTS_DIR, shards=shards, training=training, total=total)
    distributed, (reference_losses, reference_grads) = run_two_ranks(
        tmp_path, worker, lambda: stage1_losses_and_gradients(slice(0, total), training=training)
    )
    assert reference_losses["itm_loss"] > 0 and reference_losses["itc_loss"] > 0
    for name, loss in reference_losses.items():
        torch.testing.assert_close(distributed["losses"][name], loss, msg=name)
    assert distributed["grads"].keys() == reference_grads.keys()
    assert {"itm_head.weight", "temp", "query_tokens"} <= reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-7, atol=1e-12, msg=name)
