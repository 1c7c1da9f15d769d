"""Publishing to the Hub: `hf-vlm push` against a local Hub-compatible endpoint (hf_vlm.testing_hub.LocalHub),
with huggingface_hub's real client over real HTTP on 127.0.0.1.

Two groups:
- push mechanics and failures on a tiny plain transformers model (fast): one commit, sharded weights in LFS,
  stale files removed, branches, private repos, no token / bad token / other content / interrupted upload;
- the round trip of tiny BLIP-2 and CoCa checkpoints: pushed once per module, pulled by repo id in a fresh
  process with `import hf_vlm` and in one without hf_vlm (`trust_remote_code=True`), the card's usage
  snippets run against the pushed repos, then loaded offline from the HF cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load as load_safetensors
from transformers import GenerationConfig

from hf_vlm.cli import main as cli
from hf_vlm.hub import HubPushError, push_to_hub
from hf_vlm.testing import random_image, run_python_without_hf_vlm
from hf_vlm.testing_hub import LocalHub

TOKEN = "hf_local_alice_write_0123456789"  # a token of the local endpoint only
BOB_TOKEN = "hf_local_bob_write_9876543210"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with LocalHub(tokens={TOKEN: "alice", BOB_TOKEN: "bob"}, orgs={"alice": ["org"]}) as server:
        server.point_client_here(monkeypatch, tmp_path / "hf_home", TOKEN)
        yield server


@pytest.fixture
def bert_checkpoint(tmp_path):
    """A tiny plain transformers checkpoint (~140 kB of float32 weights)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    path = tmp_path / "bert"
    BertModel(config).save_pretrained(path)
    return path


def _lfs_puts(hub: LocalHub) -> int:
    return sum(1 for method, path in hub.requests if method == "PUT" and path.startswith("/lfs-upload/"))


# ------------------------------------------------------------------------------------------------------------
# Push mechanics
# ------------------------------------------------------------------------------------------------------------
def test_push_uploads_sharded_weights_config_and_card_in_one_commit(hub, bert_checkpoint, capsys):
    rc = cli(["push", str(bert_checkpoint), "org/bert-tiny", "--max-shard-size", "60KB",
              "--commit-message", "First release"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert TOKEN not in out.out + out.err

    history = hub.repo("org/bert-tiny").history("main")
    assert [c.title for c in history] == ["First release", "initial commit"]  # create_repo's commit + ONE push
    files = history[0].files
    index = json.loads(hub.read_file("org/bert-tiny", "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and set(shards) <= set(files)
    assert {"config.json", "README.md"} <= set(files)
    assert all(files[s].is_lfs for s in shards) and not files["config.json"].is_lfs

    # The weights on the Hub are exactly the checkpoint's.
    from safetensors.torch import load_file

    local = load_file(bert_checkpoint / "model.safetensors")
    remote = {}
    for shard in shards:
        remote.update(load_safetensors(hub.read_file("org/bert-tiny", shard)))
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k], local[k]) for k in local)
    card = ModelCard(hub.read_file("org/bert-tiny", "README.md").decode())
    assert card.data.library_name == "transformers"


def test_repush_replaces_the_previous_files_in_one_commit(hub, bert_checkpoint):
    first = push_to_hub(bert_checkpoint, "org/bert-tiny", max_shard_size="60KB")
    second = push_to_hub(bert_checkpoint, "org/bert-tiny", max_shard_size="10MB")

    assert hub.commit_ids("org/bert-tiny")[:2] == [second.commit_oid, first.commit_oid]
    files = set(hub.repo("org/bert-tiny").commits[second.commit_oid].files)
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert not any(name.startswith("model-0") for name in files)  # the old shards went in the same commit
    assert sorted(second.deleted) == sorted(f for f in first.files if f.startswith("model"))


def test_push_to_a_revision_creates_the_branch_and_leaves_main_alone(hub, bert_checkpoint):
    push_to_hub(bert_checkpoint, "org/bert-tiny")
    main_before = hub.commit_ids("org/bert-tiny", "main")
    result = push_to_hub(bert_checkpoint, "org/bert-tiny", revision="v2-candidate", max_shard_size="60KB")

    assert hub.commit_ids("org/bert-tiny", "main") == main_before
    assert hub.commit_ids("org/bert-tiny", "v2-candidate")[0] == result.commit_oid
    assert HfApi().model_info("org/bert-tiny", revision="v2-candidate").sha == result.commit_oid


def test_private_repo_is_invisible_without_the_token(hub, bert_checkpoint):
    push_to_hub(bert_checkpoint, "alice/secret-bert", private=True)

    assert HfApi().model_info("alice/secret-bert").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("alice/secret-bert")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=BOB_TOKEN).model_info("alice/secret-bert")


def test_local_hub_applies_a_commit_entirely_or_not_at_all(hub):
    """The endpoint's guarantee the push relies on: a commit naming an LFS object that never arrived is
    rejected as a whole, so its regular files do not land either."""
    import base64

    from huggingface_hub.utils import get_session

    HfApi().create_repo("org/atomic")
    before = hub.commit_ids("org/atomic")
    lines = [{"key": "header", "value": {"summary": "half a commit"}},
             {"key": "file", "value": {"path": "config.json", "encoding": "base64",
                                       "content": base64.b64encode(b"{}").decode()}},
             {"key": "lfsFile", "value": {"path": "model.safetensors", "algo": "sha256", "oid": "0" * 64, "size": 8}}]
    response = get_session().post(f"{hub.url}/api/models/org/atomic/commit/main",
                                  headers={"Authorization": f"Bearer {TOKEN}"}, content="".join(json.dumps(line) + "\n" for line in lines))

    assert response.status_code == 422 and "was never uploaded" in response.json()["error"]
    assert hub.commit_ids("org/atomic") == before
    assert "config.json" not in hub.repo("org/atomic").commits[before[0]].files


# ------------------------------------------------------------------------------------------------------------
# Failures: clear errors, nothing half-done
# ------------------------------------------------------------------------------------------------------------
def test_push_without_a_token_fails_before_contacting_the_hub(hub, bert_checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    rc = cli(["push", str(bert_checkpoint), "org/bert-tiny"])

    assert rc == 1
    assert "no Hugging Face token" in capsys.readouterr().err
    assert hub.requests == []


def test_a_rejected_token_is_reported_and_never_printed(hub, bert_checkpoint, monkeypatch, capsys):
    secret = "hf_not_a_valid_token_abcdef123456"
    monkeypatch.setenv("HF_TOKEN", secret)
    rc = cli(["push", str(bert_checkpoint), "org/bert-tiny"])
    out = capsys.readouterr()

    assert rc == 1
    assert "401" in out.err and "Invalid credentials" in out.err
    assert secret not in out.out + out.err
    assert ("model", "org/bert-tiny") not in hub.repos


def test_push_refuses_a_repo_that_holds_other_content(hub, bert_checkpoint, tmp_path):
    api = HfApi()
    api.create_repo("org/someone-elses-model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (other / "weights.bin").write_bytes(b"\0" * 1000)
    api.upload_folder(folder_path=other, repo_id="org/someone-elses-model")
    before = hub.commit_ids("org/someone-elses-model")
    puts_before = _lfs_puts(hub)

    with pytest.raises(HubPushError, match=r"already holds other content \(config.json, weights.bin; model type 'llama'"):
        push_to_hub(bert_checkpoint, "org/someone-elses-model")
    assert hub.commit_ids("org/someone-elses-model") == before
    assert _lfs_puts(hub) == puts_before  # refused before any upload


def test_push_refuses_a_checkpoint_that_does_not_load_cleanly(hub, bert_checkpoint):
    from safetensors.torch import load_file, save_file

    weights = load_file(bert_checkpoint / "model.safetensors")
    del weights["pooler.dense.weight"]
    save_file(weights, bert_checkpoint / "model.safetensors", metadata={"format": "pt"})

    with pytest.raises(HubPushError, match=r"does not load cleanly as BertModel \(missing_keys: pooler.dense.weight\)"):
        push_to_hub(bert_checkpoint, "org/bert-tiny")
    assert hub.requests == []  # checked before anything is sent


def test_interrupted_upload_leaves_no_commit_and_a_retry_completes(hub, bert_checkpoint):
    push_to_hub(bert_checkpoint, "org/bert-tiny")  # an existing release that must survive the failed push
    before = hub.commit_ids("org/bert-tiny")
    hub.fail_next_lfs_uploads(1, keep_bytes=100)

    with pytest.raises(HubPushError) as failure:
        push_to_hub(bert_checkpoint, "org/bert-tiny", max_shard_size="60KB")
    message = str(failure.value)
    assert "upload to org/bert-tiny@main failed" in message and "IncompleteBody" in message
    assert f"No commit was made; the repository is unchanged (main is still at {before[0][:10]})" in message
    assert hub.commit_ids("org/bert-tiny") == before
    assert not any(c.title.startswith("Upload") and c.oid not in before for c in hub.repo("org/bert-tiny").commits.values())

    retried = push_to_hub(bert_checkpoint, "org/bert-tiny", max_shard_size="60KB")
    assert hub.commit_ids("org/bert-tiny") == [retried.commit_oid, *before]


# ------------------------------------------------------------------------------------------------------------
# Round trip of tiny BLIP-2 and CoCa checkpoints
# ------------------------------------------------------------------------------------------------------------
# Runs in this process (reference) and in the fresh processes (pulled models): the same inputs through the
# same calls must give identical tensors.
MODEL_OUTPUTS = textwrap.dedent('''
    import torch

    def model_outputs(model, inputs):
        # One thread: the same reduction order in every process, so equal weights give bit-equal outputs.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model.eval()
            with torch.no_grad():
                out = model(**inputs)
                result = {k: v for k, v in out.items()
                          if k in ("logits", "logits_per_image", "image_embeds", "text_embeds") and torch.is_tensor(v)}
                result["generated"] = model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=4,
                                                     do_sample=False)
        finally:
            torch.set_num_threads(threads)
        return result
''')


def _blip2_checkpoint(folder: Path, t5_tokenizer_dir: Path):
    from transformers import T5Tokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5Processor
    from hf_vlm.presets import get_config

    model = Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).eval()
    processor = Blip2FlanT5Processor.from_tokenizers(T5Tokenizer.from_pretrained(t5_tokenizer_dir), image_size=32)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = dict(processor(images=random_image(48, seed=1), text="Question: what color is the circle? Short answer:",
                            return_tensors="pt"))
    inputs["decoder_input_ids"] = torch.tensor([[0, 5, 9, 4]])
    return model, inputs


def _coca_checkpoint(folder: Path, t5_tokenizer_dir: Path):
    from hf_vlm.modeling.coca import CocaModel, CocaProcessor
    from hf_vlm.presets import get_config
    from hf_vlm.testing import TINY_CORPUS
    from hf_vlm.tokenization import train_coca_tokenizer

    config = get_config("coca-tiny")
    model = CocaModel(config).eval()
    tokenizer = train_coca_tokenizer(TINY_CORPUS, vocab_size=config.text_config.vocab_size)
    processor = CocaProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = dict(processor(images=random_image(48, seed=2), text=["a red circle", "a blue square above a triangle"],
                            return_tensors="pt", padding=True))
    return model, inputs


ROUND_TRIP = {"org/blip2-tiny": _blip2_checkpoint, "org/coca-tiny": _coca_checkpoint}


EVAL_RESULTS = {
    "org/blip2-tiny": {"caption": {"metrics": {"cider": 0.5, "bleu4": 0.125}, "data": "scenes:test", "num_samples": 8},
                       "vqa": {"metrics": {"accuracy": 0.375}, "data": "scenes:test", "num_samples": 8}},
    "org/coca-tiny": {"zero-shot": {"metrics": {"top1": 0.25, "top5": 0.75}, "data": "scenes:test", "num_samples": 8}},
}


@pytest.fixture(scope="module")
def published(tmp_path_factory, t5_tokenizer_dir):
    """Both tiny models pushed (each with an eval_results.json next to its weights) and their reference outputs."""
    from hf_vlm.evaluation import save_results

    root = tmp_path_factory.mktemp("published")
    namespace = {}
    exec(MODEL_OUTPUTS, namespace)
    with LocalHub(tokens={TOKEN: "alice"}, orgs={"alice": ["org"]}) as server:
        references, cards = {}, {}
        with pytest.MonkeyPatch.context() as mp:
            server.point_client_here(mp, root / "pusher_home", TOKEN)
            for repo_id, build in ROUND_TRIP.items():
                folder = root / repo_id.split("/")[1]
                model, inputs = build(folder, t5_tokenizer_dir)
                # A pulled model decodes as the pushed generation_config.json says (the family's recommended
                # decoding, written by save_pretrained), so the reference does too.
                model.generation_config = GenerationConfig.from_pretrained(folder)
                for task, entry in EVAL_RESULTS[repo_id].items():  # as hf_vlm.evaluation writes them
                    save_results(folder, task, entry)
                torch.save(inputs, root / f"{folder.name}-inputs.pt")
                references[repo_id] = namespace["model_outputs"](model, inputs)
                push_to_hub(folder, repo_id, max_shard_size="400KB")
                cards[repo_id] = server.read_file(repo_id, "README.md").decode()
        random_image(64, seed=3).save(root / "example.jpg")  # the image the card snippets open
        yield {"hub": server, "root": root, "references": references, "cards": cards,
               "env": {**server.client_env(), "HF_HUB_DISABLE_TELEMETRY": "1"}}


def _snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.DOTALL)


def _pull_script(published, repo_ids, trust_remote_code: bool, snippet_index: int) -> str:
    """Load each repo by id, save its outputs on the stored inputs, then run the card's usage snippet."""
    lines = [MODEL_OUTPUTS, "import transformers", "from transformers import AutoModel"]
    for repo_id in repo_ids:
        name = repo_id.split("/")[1]
        lines += [
            f"model = AutoModel.from_pretrained({repo_id!r}, trust_remote_code={trust_remote_code})",
            f"print('LOADED', {repo_id!r}, type(model).__module__)",
            f"inputs = torch.load({str(published['root'] / f'{name}-inputs.pt')!r})",
            f"torch.save(model_outputs(model, inputs), 'outputs-{name}.pt')",
            f"exec(compile({_snippets(published['cards'][repo_id])[snippet_index]!r}, 'snippet-{name}', 'exec'), {{}})",
            f"print('SNIPPET OK', {repo_id!r})",
            # the whole repository, as huggingface_hub's snapshot_download sees it
            "from pathlib import Path",
            "from huggingface_hub import snapshot_download",
            f"snapshot = Path(snapshot_download({repo_id!r}))",
            f"print('SNAPSHOT', {repo_id!r}, sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob('*') if p.is_file()))",
        ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fresh_pull(published):
    """A fresh interpreter with hf_vlm: `import hf_vlm; AutoModel.from_pretrained(repo_id)` from the endpoint."""
    work = published["root"] / "fresh"
    work.mkdir()
    (work / "example.jpg").write_bytes((published["root"] / "example.jpg").read_bytes())
    script = "import hf_vlm\n" + _pull_script(published, ROUND_TRIP, trust_remote_code=False, snippet_index=0)
    env = {**published["env"], "HF_HOME": str(published["root"] / "fresh_home")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=work, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    return proc, work


def test_fresh_process_with_hf_vlm_pulls_by_repo_id_with_identical_outputs(published, fresh_pull):
    proc, work = fresh_pull
    assert proc.returncode == 0, proc.stderr[-4000:]
    for repo_id, reference in published["references"].items():
        assert f"LOADED {repo_id} hf_vlm.modeling" in proc.stdout  # our registered classes, not remote code
        pulled = torch.load(work / f"outputs-{repo_id.split('/')[1]}.pt")
        assert pulled.keys() == reference.keys() and "generated" in pulled
        for key in reference:
            assert torch.equal(pulled[key], reference[key]), f"{repo_id}: {key} differs after the round trip"


def test_card_usage_snippets_run_against_the_pushed_repos(published, fresh_pull):
    proc, _ = fresh_pull
    assert proc.returncode == 0, proc.stderr[-4000:]
    for repo_id in ROUND_TRIP:
        assert f"SNIPPET OK {repo_id}" in proc.stdout


def test_snapshot_download_gets_every_pushed_file(published, fresh_pull):
    proc, _ = fresh_pull
    assert proc.returncode == 0, proc.stderr[-4000:]
    for repo_id in ROUND_TRIP:
        pushed = sorted(published["hub"].repo(repo_id).history("main")[0].files)
        assert f"SNAPSHOT {repo_id} {pushed}" in proc.stdout


def test_trust_remote_code_pull_without_hf_vlm(published):
    work = published["root"] / "remote"
    work.mkdir()
    (work / "example.jpg").write_bytes((published["root"] / "example.jpg").read_bytes())
    script = _pull_script(published, ROUND_TRIP, trust_remote_code=True, snippet_index=1)
    proc = run_python_without_hf_vlm(script, cwd=work, env={**published["env"],
                                                            "HF_HOME": str(published["root"] / "remote_home")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    for repo_id, reference in published["references"].items():
        assert f"LOADED {repo_id} transformers_modules." in proc.stdout  # the code stored in the repo
        assert f"SNIPPET OK {repo_id}" in proc.stdout
        pulled = torch.load(work / f"outputs-{repo_id.split('/')[1]}.pt")
        for key in reference:
            assert torch.equal(pulled[key], reference[key]), f"{repo_id}: {key} differs with trust_remote_code"


def test_offline_loading_by_repo_id_from_the_hf_cache(published, fresh_pull):
    """HF_HUB_OFFLINE=1 (set for every test by conftest): the cache the fresh process filled is enough."""
    from transformers import AutoModel

    assert fresh_pull[0].returncode == 0, fresh_pull[0].stderr[-4000:]
    namespace = {}
    exec(MODEL_OUTPUTS, namespace)
    served = len(published["hub"].requests)
    cache = published["root"] / "fresh_home" / "hub"
    for repo_id, reference in published["references"].items():
        model = AutoModel.from_pretrained(repo_id, cache_dir=cache)
        inputs = torch.load(published["root"] / f"{repo_id.split('/')[1]}-inputs.pt")
        outputs = namespace["model_outputs"](model, inputs)
        assert all(torch.equal(outputs[k], reference[k]) for k in reference)
    assert len(published["hub"].requests) == served  # nothing was asked of the endpoint


def test_pushed_cards_hold_the_hub_metadata(published):
    for repo_id, text in published["cards"].items():
        card = ModelCard(text)
        data = card.data
        assert data.library_name == "transformers"
        assert data.license == "apache-2.0"
        assert {"hf-vlm", "custom_code"} <= set(data.tags)
        assert data.pipeline_tag == ("image-text-to-text" if "blip2" in repo_id else "zero-shot-image-classification")
        # model-index: every number of the eval_results.json that sat next to the weights
        expected = {(task, metric): value for task, entry in EVAL_RESULTS[repo_id].items()
                    for metric, value in entry["metrics"].items()}
        found = {(r.task_type, r.metric_type): r for r in data.eval_results}
        task_ids = {"caption": "image-to-text", "vqa": "visual-question-answering",
                    "zero-shot": "zero-shot-image-classification"}
        assert {(task_ids[t], m): v for (t, m), v in expected.items()} == {k: r.metric_value for k, r in found.items()}
        assert all((r.dataset_name, r.dataset_split) == ("scenes", "test") for r in found.values())


def test_every_python_block_of_the_pushed_cards_runs_in_a_fresh_venv_without_hf_vlm(published, tmp_path):
    """What a reader of the card does: a virtualenv with the packages the card's install line names and no hf-vlm
    (tests/wheel_env.py: the project venv's packages, its editable hf-vlm not active), each block as written. One
    interpreter of that venv runs the four blocks one after the other, each in fresh globals (so each needs only its
    own imports): four interpreters spent 40 s more on importing torch and transformers again."""
    from wheel_env import clean_env, make_venv

    python = make_venv(tmp_path / "venv")
    (tmp_path / "example.jpg").write_bytes((published["root"] / "example.jpg").read_bytes())
    assert subprocess.run([str(python), "-c", "import hf_vlm"], cwd=tmp_path, env=clean_env(),
                          capture_output=True).returncode != 0
    blocks = {}
    for repo_id, card in published["cards"].items():
        assert 'pip install torch torchvision "transformers>=5.23" timm pillow' in card
        assert "pip install hf-vlm`" not in card and "brief" not in card.lower()
        snippets = _snippets(card)
        assert len(snippets) == 2 and all("trust_remote_code=True" in block for block in snippets)
        blocks.update({f"{repo_id} block {index}": block for index, block in enumerate(snippets)})
    runner = ("import json, sys, traceback\n"
              "for name, block in json.load(open(sys.argv[1])).items():\n"
              "    try:\n"
              "        exec(compile(block, name, 'exec'), {'__name__': '__main__'})\n"
              "    except BaseException:\n"
              "        sys.exit(f'{name} failed:\\n{block}\\n{traceback.format_exc()}')\n"
              "    print('BLOCK OK', name, flush=True)\n")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = clean_env(**published["env"], HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([str(python), "-c", runner, str(tmp_path / "blocks.json")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [line.removeprefix("BLOCK OK ") for line in result.stdout.splitlines() if line.startswith("BLOCK OK ")] \
        == list(blocks)


def test_cards_name_only_task_ids_the_hub_has(published):
    """pipeline_tag and every model-index task type are Hub task ids (huggingface_hub's own list of them)."""
    hub_tasks = {"image-to-text", "image-text-to-text", "visual-question-answering", "zero-shot-image-classification",
                 "image-feature-extraction", "image-classification", "feature-extraction"}
    for text in published["cards"].values():
        data = ModelCard(text).data
        assert data.pipeline_tag in hub_tasks
        for entry in data.eval_results or []:
            assert entry.task_type in hub_tasks, entry.task_type
