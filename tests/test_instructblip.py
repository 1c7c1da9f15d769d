"""The question-aware Q-Former (`Blip2FlanT5Config.qformer_text_input`, BLIP-2 section 4.3 / InstructBLIP) and
`hf-vlm convert hf-instructblip`.

The Q-Former reads the question (`qformer_input_ids`) next to its queries: the answer depends on it, batches with
padded questions answer as one question at a time, stage 1's text path initializes it. transformers'
`InstructBlipForConditionalGeneration` with a tiny T5, random weights, saved, converted and loaded as ours computes
the same logits (max|diff| < 1e-4) and the same greedy and beam tokens, batched, with prompts and questions of
different lengths. The instructblip-flan-t5-xl preset has the published parameter count (meta device).
"""

from __future__ import annotations

import pytest
import torch

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5ForConditionalGeneration, Blip2FlanT5ForPretraining
from hf_vlm.presets import get_config, preset_dict

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def pixels(batch=2, seed=0):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def question_aware():
    torch.manual_seed(0)
    return Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny", qformer_text_input=True)).eval()


# Two questions of different lengths in the Q-Former's vocabulary ([CLS] ... [SEP], right-padded), and two T5
# prompts of different lengths (right-padded, as the processor pads them).
QUESTIONS = torch.tensor([[2, 40, 41, 42, 43, 3], [2, 50, 51, 3, 0, 0]])
PROMPTS = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])


@torch.no_grad()
def test_the_answer_depends_on_the_question_given_to_the_q_former(question_aware):
    images = pixels(1).expand(2, -1, -1, -1)  # the same image twice
    question, other = QUESTIONS[:1].expand(2, -1), QUESTIONS[:1].clone().expand(2, -1).clone()
    other[1, 2] = 60  # the second row asks something else
    features = question_aware.get_image_features(images, qformer_input_ids=other).pooler_output
    assert features.shape == (2, 8, 64)  # only the query outputs reach T5
    assert (features[0] - features[1]).abs().max() > 1e-3
    same = question_aware.get_image_features(images, qformer_input_ids=question).pooler_output
    torch.testing.assert_close(same[0], same[1])
    output = question_aware(pixel_values=images, input_ids=PROMPTS[:1].expand(2, -1), qformer_input_ids=other,
                            decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    assert output.query_output.shape == (2, 8, 64) and output.qformer_model_output.last_hidden_state.shape[1] == 8 + 6
    assert (output.logits[0] - output.logits[1]).abs().max() > 1e-4


def test_the_question_is_required_by_a_question_aware_q_former_and_refused_by_another(question_aware):
    with pytest.raises(ValueError, match="qformer_text_input=True.*qformer_input_ids"):
        question_aware.generate(pixel_values=pixels(), max_new_tokens=2)
    plain = Blip2FlanT5ForConditionalGeneration(get_config("blip2-tiny")).eval()
    assert not hasattr(plain.qformer, "embeddings")  # BLIP-2's stage 2 keeps no text path
    with pytest.raises(ValueError, match="qformer_text_input=False"):
        plain.generate(pixel_values=pixels(), qformer_input_ids=QUESTIONS, max_new_tokens=2)
    with pytest.raises(ValueError, match="qformer_input_ids must be"):
        question_aware.get_image_features(pixels(), qformer_input_ids=QUESTIONS[:1])


@torch.no_grad()
def test_a_batch_of_padded_questions_and_prompts_answers_as_one_at_a_time(question_aware):
    images, mask, qmask = pixels(), (PROMPTS != 0).long(), (QUESTIONS != 0).long()
    for beams in (1, 3):
        settings = dict(max_new_tokens=5, num_beams=beams, do_sample=False)
        batched = question_aware.generate(pixel_values=images, input_ids=PROMPTS, attention_mask=mask,
                                          qformer_input_ids=QUESTIONS, qformer_attention_mask=qmask, **settings)
        for i in range(2):
            p, q = PROMPTS[i : i + 1, : mask[i].sum()], QUESTIONS[i : i + 1, : qmask[i].sum()]
            single = question_aware.generate(pixel_values=images[i : i + 1], input_ids=p, qformer_input_ids=q,
                                             **settings)
            assert batched[i, : single.shape[1]].tolist() == single[0].tolist(), (beams, i)


def test_stage_2_with_the_question_aware_q_former_starts_from_stage_1s_text_path(tmp_path):
    """BLIP-2 section 4.3 fine-tunes from the stage-1 Q-Former, whose text path now reads the question: its word
    embeddings and text feed-forward blocks are loaded, not reported unused."""
    from transformers import T5Config

    torch.manual_seed(0)
    stage1 = Blip2FlanT5ForPretraining(get_config("blip2-tiny"))
    stage1.save_pretrained(tmp_path / "stage1")
    model, info = Blip2FlanT5ForConditionalGeneration.from_stage1(
        tmp_path / "stage1", T5Config(**get_config("blip2-tiny").text_config.to_dict()), output_loading_info=True,
        qformer_text_input=True,
    )
    assert model.config.qformer_text_input
    for key in ("qformer.embeddings.word_embeddings.weight", "qformer.encoder.layer.1.intermediate.dense.weight"):
        torch.testing.assert_close(model.state_dict()[key], stage1.state_dict()[key])
        assert key not in info["unused_stage1_keys"]
    assert "text_proj.weight" in info["unused_stage1_keys"]
    assert [k for k in info["newly_initialized_keys"] if not k.startswith("language_projection.")] == []


# ----------------------------------------------------------------------------------------------------------------
# The processor gives the question to the Q-Former: generate, the pipeline, hf-vlm eval, the Space, training batches

QUESTION = "Question: what color is the circle? Short answer:"


@pytest.fixture(scope="module")
def question_aware_checkpoint(tmp_path_factory, t5_tokenizer_dir, bert_tokenizer_dir):
    """A question-aware blip2-tiny checkpoint folder (random weights) with its processor (32 px)."""
    from transformers import AutoTokenizer

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("blip2-tiny-question-aware")
    processor = Blip2FlanT5Processor.from_tokenizers(
        AutoTokenizer.from_pretrained(t5_tokenizer_dir), AutoTokenizer.from_pretrained(bert_tokenizer_dir),
        image_size=32, max_text_length=8, qformer_text_input=True,
    )
    # at most the tiny tokenizer's 96 pieces, so that generated ids decode to words
    text_config = {**preset_dict("blip2-tiny")["text_config"], "vocab_size": 96}
    model = Blip2FlanT5ForConditionalGeneration(
        get_config("blip2-tiny", qformer_text_input=True, text_config=text_config)).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_the_processor_gives_the_prompt_to_the_q_former_truncated_on_the_left(question_aware_checkpoint):
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.testing import random_image

    processor = Blip2FlanT5Processor.from_pretrained(question_aware_checkpoint)  # the flag survives a round trip
    assert processor.qformer_text_input and "qformer_input_ids" in processor.model_input_names
    bert = processor.qformer_tokenizer
    images = [random_image(32, seed=1), random_image(32, seed=2)]
    inputs = processor(images=images, text=["what color?", QUESTION], return_tensors="pt")
    ids, mask = inputs["qformer_input_ids"], inputs["qformer_attention_mask"]
    assert ids.shape == (2, 8) and mask[0].sum() < 8 and mask[1].sum() == 8  # longest, at most max_text_length
    assert ids[0, : mask[0].sum()].tolist() == bert("what color?")["input_ids"]
    # The long prompt keeps its end ("... short answer:" and [SEP]), as InstructBLIP's left truncation does.
    assert ids[1].tolist() == [bert.cls_token_id] + bert(QUESTION)["input_ids"][-7:]
    assert bert.truncation_side == "right"  # stage-1 captions still truncate on the right
    # Captioning (no prompt): the Q-Former reads an empty one, [CLS] [SEP].
    caption = processor(images=images, return_tensors="pt")
    assert caption["qformer_input_ids"].tolist() == [[bert.cls_token_id, bert.sep_token_id]] * 2
    plain = Blip2FlanT5Processor(processor.image_processor, processor.tokenizer, qformer_tokenizer=bert)
    assert "qformer_input_ids" not in plain(images=images, text=QUESTION, return_tensors="pt")


def test_the_pipeline_gives_the_question_to_the_q_former(question_aware_checkpoint):
    """The model refuses to run without qformer_input_ids: the pipeline answering at all proves it passes them."""
    from transformers import pipeline

    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.testing import random_image

    pipe = pipeline("image-text-to-text", model=str(question_aware_checkpoint))
    assert pipe.model.config.qformer_text_input
    image = random_image(32, seed=5)
    processor = Blip2FlanT5Processor.from_pretrained(question_aware_checkpoint)
    for prompt in (QUESTION, ""):
        inputs = processor(images=[image], text=prompt, return_tensors="pt")
        with torch.no_grad():
            expected = processor.batch_decode(pipe.model.generate(**inputs, max_new_tokens=4), skip_special_tokens=True)
        out = pipe(images=image, text=prompt, max_new_tokens=4, return_full_text=False)
        assert out[0]["generated_text"] == expected[0] and expected[0].strip()


def test_hf_vlm_eval_captions_and_answers_with_a_question_aware_q_former(question_aware_checkpoint, capsys):
    from hf_vlm.cli import main

    assert main(["eval", str(question_aware_checkpoint), "--task", "caption", "vqa", "--num-samples", "2",
                 "--max-new-tokens", "3", "--batch-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "cider" in table and "vqa_accuracy" in table


def test_the_space_gives_the_question_to_the_q_former(question_aware_checkpoint):
    pytest.importorskip("gradio")
    from hf_vlm import space
    from hf_vlm.testing import random_image

    loaded = space.load_models(blip2=str(question_aware_checkpoint)).blip2
    image = random_image(32, seed=3)
    assert space._generate_text(loaded, image, QUESTION, {"max_new_tokens": 3}).strip()
    assert space._generate_text(loaded, image, None, {"max_new_tokens": 3}).strip()


def test_vqa_training_batches_carry_the_question_for_the_q_former(question_aware_checkpoint):
    from hf_vlm.data import ImageTextCollator
    from hf_vlm.data.collators import VQA_PROMPT
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor

    processor = Blip2FlanT5Processor.from_pretrained(question_aware_checkpoint)
    collator = ImageTextCollator.for_recipe("blip2-vqa", processor)
    samples = [{"pixel_values": pixels(1, seed=i)[0], "question": q, "answers": [a]}
               for i, (q, a) in enumerate([("what color?", "red"), ("how many circles are there?", "two")])]
    batch = collator(samples)
    expected = processor.question_inputs([VQA_PROMPT.format(s["question"]) for s in samples])
    assert torch.equal(batch["qformer_input_ids"], expected["qformer_input_ids"])
    assert torch.equal(batch["qformer_attention_mask"], expected["qformer_attention_mask"])
    model = Blip2FlanT5ForConditionalGeneration.from_pretrained(question_aware_checkpoint).train()
    loss = model(**batch).loss
    loss.backward()
    assert model.qformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # the question is trained on
    plain = Blip2FlanT5Processor(processor.image_processor, processor.tokenizer, qformer_tokenizer=processor.qformer_tokenizer)
    assert "qformer_input_ids" not in ImageTextCollator.for_recipe("blip2-vqa", plain)(samples)


# ----------------------------------------------------------------------------------------------------------------
# hf-vlm convert hf-instructblip: parity with transformers' InstructBlipForConditionalGeneration

TINY_T5_VOCAB = 128  # the tiny tokenizer's pieces, InstructBlipProcessor's <image> after them, room to spare


@pytest.fixture(scope="module")
def instructblip(tmp_path_factory, t5_tokenizer_dir, bert_tokenizer_dir):
    """(transformers' InstructBLIP with random weights, its processor, the converted folder, the summary): the
    published layout (T5 tokenizer at the top, the Q-Former's in qformer_tokenizer/), converted through the CLI."""
    from test_conversion_blip2 import TINY_QFORMER, TINY_T5, TINY_VISION, randomize_
    from transformers import (
        AutoTokenizer,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        T5Config,
    )

    from hf_vlm.cli import main
    from hf_vlm.modeling.blip2_flant5.processing_blip2_flant5 import build_image_processor

    root = tmp_path_factory.mktemp("instructblip")
    processor = InstructBlipProcessor(build_image_processor(32), AutoTokenizer.from_pretrained(t5_tokenizer_dir),
                                      AutoTokenizer.from_pretrained(bert_tokenizer_dir), num_query_tokens=8)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    t5 = T5Config(**{**TINY_T5, "vocab_size": TINY_T5_VOCAB}).to_dict()
    config = InstructBlipConfig(vision_config=TINY_VISION, text_config=t5, num_query_tokens=8,
                                qformer_config={**TINY_QFORMER, "vocab_size": 256, "max_position_embeddings": 64},
                                image_token_index=image_token)
    reference = InstructBlipForConditionalGeneration(config)
    # FlanT5's separate lm_head, as the published checkpoint has it
    reference.language_model.lm_head.weight = torch.nn.Parameter(torch.empty_like(reference.language_model.shared.weight))
    randomize_(reference, seed=7)
    reference.save_pretrained(root / "transformers")
    processor.save_pretrained(root / "transformers")
    assert (root / "transformers" / "qformer_tokenizer").is_dir()
    assert main(["convert", "hf-instructblip", str(root / "transformers"), str(root / "converted"), "--no-progress"]) == 0
    return reference, processor, root


def test_every_instructblip_tensor_converts(instructblip):
    import json
    import math

    from safetensors import safe_open

    reference, _, root = instructblip
    with safe_open(str(root / "converted" / "model.safetensors"), "pt") as f:
        converted = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    assert "qformer.layernorm.weight" in converted and "qformer.embeddings.word_embeddings.weight" in converted
    assert "qformer.encoder.layer.1.intermediate.dense.weight" in converted
    # transformers' fused qkv bias (3 x 64 per vision layer) becomes EVA's q_bias + v_bias (2 x 64)
    assert sum(converted.values()) == sum(p.numel() for p in reference.parameters()) - 2 * 64
    config = json.loads((root / "converted" / "config.json").read_text())
    assert config["qformer_text_input"] is True and config["qformer_config"]["vocab_size"] == 256
    processor_config = json.loads((root / "converted" / "processor_config.json").read_text())
    assert processor_config["qformer_text_input"] is True and processor_config["max_text_length"] == 128


@torch.no_grad()
def test_converted_instructblip_matches_transformers_logits_greedy_and_beams_batched(instructblip):
    """Batch 3, T5 prompts of 1, 3 and 5 tokens and instructions of 2, 4 and 6 Q-Former tokens, all padded on the
    right as both processors pad them (InstructBLIP puts its 8 <image> placeholders in front of the prompt)."""
    from transformers import AutoModel

    reference, _, root = instructblip
    ours = AutoModel.from_pretrained(root / "converted").eval()
    assert type(ours) is Blip2FlanT5ForConditionalGeneration and ours.config.qformer_text_input
    prompts = torch.tensor([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0], [1, 0, 0, 0, 0]])
    questions = torch.tensor([[2, 40, 41, 42, 43, 3], [2, 50, 51, 3, 0, 0], [2, 3, 0, 0, 0, 0]])
    mask, qmask = (prompts != 0).long(), (questions != 0).long()
    images = pixels(3, seed=11)
    placeholders = torch.full((3, 8), reference.config.image_token_index)
    theirs = dict(pixel_values=images, qformer_input_ids=questions, qformer_attention_mask=qmask,
                  input_ids=torch.cat([placeholders, prompts], 1), attention_mask=torch.cat([torch.ones(3, 8).long(), mask], 1))
    mine = dict(pixel_values=images, qformer_input_ids=questions, qformer_attention_mask=qmask, input_ids=prompts,
                attention_mask=mask)
    decoder_input_ids = torch.tensor([[0, 4, 5, 6]] * 3)
    diff = (reference(**theirs, decoder_input_ids=decoder_input_ids).logits
            - ours(**mine, decoder_input_ids=decoder_input_ids).logits).abs().max().item()
    print(f"max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    for beams in (1, 3):
        settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=beams, do_sample=False)
        expected = reference.generate(**theirs, **settings)
        assert ours.generate(**mine, **settings).tolist() == expected.tolist(), f"num_beams={beams}"
        assert len({tuple(row) for row in expected.tolist()}) == 3, "degenerate test: equal outputs"


@torch.no_grad()
def test_converted_processor_and_model_answer_as_transformers_instructblip(instructblip):
    """From text to tokens: InstructBlipProcessor + transformers' model and our converted processor + model give
    the same answers (beam search) to two instructions of different lengths, each processor padding its own way."""
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.testing import random_image

    reference, their_processor, root = instructblip
    ours = Blip2FlanT5ForConditionalGeneration.from_pretrained(root / "converted").eval()
    our_processor = Blip2FlanT5Processor.from_pretrained(root / "converted")
    images = [random_image(32, seed=s) for s in (1, 2)]
    prompts = ["what color is the circle?", "Question: how many squares are in the picture? Short answer:"]
    theirs = their_processor(images=images, text=prompts, padding=True, return_tensors="pt")
    mine = our_processor(images=images, text=prompts, return_tensors="pt")
    assert torch.equal(mine["qformer_input_ids"], theirs["qformer_input_ids"])
    settings = dict(max_new_tokens=6, min_new_tokens=6, num_beams=2)
    assert ours.generate(**mine, **settings).tolist() == reference.generate(**theirs, **settings).tolist()


def test_a_blip2_folder_is_refused_by_hf_instructblip_with_a_clear_error(tmp_path, capsys):
    from transformers import Blip2Config

    from hf_vlm.cli import main

    Blip2Config().save_pretrained(tmp_path / "blip2")
    assert main(["convert", "hf-instructblip", str(tmp_path / "blip2"), str(tmp_path / "out")]) == 1
    assert "expected 'instructblip'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The instructblip-flan-t5-xl preset and its model card

PUBLISHED_PARAMETERS = 4_022_969_088  # Salesforce/instructblip-flan-t5-xl (separate lm_head, EVA's zero k bias)


@pytest.mark.slow
def test_instructblip_flan_t5_xl_preset_has_the_published_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        model = Blip2FlanT5ForConditionalGeneration(get_config("instructblip-flan-t5-xl"))
    total = sum(p.numel() for p in model.parameters())
    # transformers stores a (zero) key bias per EVA block that timm keeps as a buffer: 39 x 1408, same function
    zero_key_bias = sum(m.k_bias.numel() for m in model.vision_model.modules() if hasattr(m, "k_bias"))
    assert total + zero_key_bias == PUBLISHED_PARAMETERS
    assert sum(p.numel() for p in model.qformer.parameters()) == 185_660_160  # with the instruction's text path
    assert model.language_model.lm_head.weight is not model.language_model.shared.weight


def test_the_published_instructblip_config_converts_to_the_preset():
    """What hf-instructblip makes of Salesforce/instructblip-flan-t5-xl's config (transformers' defaults are its
    ViT-g and BERT-base Q-Former; 30523 = BERT + [DEC]) is the preset, so its model card finds the variant."""
    from transformers import InstructBlipConfig

    from hf_vlm.conversion.hf_instructblip import config_from_hf
    from hf_vlm.hub.cards import match_preset

    published = InstructBlipConfig(qformer_config={"vocab_size": 30523}, num_query_tokens=32,
                                   text_config=preset_dict("instructblip-flan-t5-xl")["text_config"])
    assert match_preset(config_from_hf(published)) == "instructblip-flan-t5-xl"
    assert match_preset(get_config("blip2-flan-t5-xl")) == "blip2-flan-t5-xl"  # the flag tells the two apart


def test_instructblip_card_names_the_variant_and_the_question_aware_q_former(tmp_path):
    from hf_vlm.hub.cards import render_card

    folder = tmp_path / "instructblip-flan-t5-xl"
    get_config("instructblip-flan-t5-xl").save_pretrained(folder)
    text = str(render_card(folder, "Salesforce-like/instructblip-flan-t5-xl"))
    assert "# InstructBLIP-FlanT5-XL" in text and "Its Q-Former is question-aware" in text
    assert "instruction-tuned on 13 held-in datasets" in text and "16 NVIDIA A100 40GB GPUs" in text
    get_config("blip2-flan-t5-xl").save_pretrained(tmp_path / "blip2")
    assert "question-aware" not in str(render_card(tmp_path / "blip2", "Salesforce-like/blip2-flan-t5-xl"))


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning with the question-aware Q-Former (BLIP-2 section 4.3)


def test_the_xl_vqa_recipe_fine_tunes_the_question_aware_q_former():
    from hf_vlm.trainers.recipes import get_recipe

    assert get_recipe("blip2-flan-t5-xl-vqa").model_overrides["qformer_text_input"] is True


def test_vqa_fine_tuning_with_qformer_text_input_trains_on_the_question(tmp_path, t5_tokenizer_dir, bert_tokenizer_dir):
    """`hf-vlm finetune --qformer_text_input true` with a processor saved without the flag: the run gives the question
    to the Q-Former (the model refuses to train otherwise) and its checkpoint's processor keeps doing so."""
    import json

    from transformers import AutoTokenizer

    from hf_vlm.cli import main
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.scenes import export_scenes

    folders = export_scenes(tmp_path / "vqa", {"train": 8}, layout="vqa")
    Blip2FlanT5Processor.from_tokenizers(AutoTokenizer.from_pretrained(t5_tokenizer_dir),
                                         AutoTokenizer.from_pretrained(bert_tokenizer_dir),
                                         image_size=32).save_pretrained(tmp_path / "processor")
    out = tmp_path / "out"
    assert main(["finetune", "--recipe", "blip2-tiny-vqa", "--model", "blip2-tiny", "--qformer_text_input", "true",
              "--processor", str(tmp_path / "processor"), "--train_data", str(folders["train"]),
              "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "true",
              "--dataset_cache_dir", str(tmp_path / "cache")]) in (0, None)
    model = Blip2FlanT5ForConditionalGeneration.from_pretrained(out)
    assert model.config.qformer_text_input
    assert Blip2FlanT5Processor.from_pretrained(out).qformer_text_input
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(v == v and v > 0 for v in losses)


def test_hf_vlm_caption_gives_the_prompt_to_the_q_former(question_aware_checkpoint, tmp_path):
    """Bulk captioning / answering (`hf-vlm caption`) of an image folder equals one-at-a-time generate."""
    import pyarrow.parquet as pq
    from transformers import GenerationConfig

    from hf_vlm.cli import main
    from hf_vlm.modeling.blip2_flant5 import Blip2FlanT5Processor
    from hf_vlm.testing import random_image

    images = [random_image(32, seed=s) for s in range(3)]
    (tmp_path / "images").mkdir()
    for i, image in enumerate(images):
        image.save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "metadata.jsonl").write_text(  # an imagefolder
        "".join(f'{{"file_name": "{i}.png", "text": "a scene"}}\n' for i in range(3)))
    model = Blip2FlanT5ForConditionalGeneration.from_pretrained(question_aware_checkpoint).eval()
    processor = Blip2FlanT5Processor.from_pretrained(question_aware_checkpoint)
    for prompt, name in ((QUESTION, "vqa"), (None, "caption")):
        args = ["caption", str(tmp_path / "images"), "--model", str(question_aware_checkpoint), "--output",
                str(tmp_path / name), "--batch-size", "2", "--max-new-tokens", "3"]
        assert main(args + (["--prompt", prompt] if prompt else [])) == 0
        rows = pq.read_table(tmp_path / name / "captions").to_pydict()
        decoding = GenerationConfig.from_pretrained(
            question_aware_checkpoint, "generation_config.json" if prompt else "caption_generation_config.json")
        decoding.update(max_new_tokens=3, min_new_tokens=min(decoding.min_new_tokens or 0, 3))
        with torch.no_grad():
            expected = [processor.batch_decode(model.generate(
                **processor(images=[image], text=prompt if prompt else "", return_tensors="pt"),
                generation_config=decoding), skip_special_tokens=True)[0].strip() for image in images]
        assert sorted(rows["caption"]) == sorted(expected)
