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
from hf_vlm.presets import get_config

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
