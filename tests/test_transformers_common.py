"""transformers' own common model tests (`ModelTesterMixin` of the installed version) on our three model classes.

The mixin comes from the transformers sdist that `make setup` fetches (see tests/transformers_testsuite.py); the
model testers (tiny configs and inputs) are ours. A common test that does not apply is skipped with the reason
transformers itself gives for its BLIP-2 / CLIP tests. Our own conformance tests for what transformers'
`GenerationTesterMixin` checks (not in its sdist) follow the common tests of each generative class.
"""

from __future__ import annotations

import unittest

import torch
from transformers_testsuite import GenerationTesterMixin, load_test_modeling_common

import hf_vlm  # noqa: F401  (registers the Auto classes)
from hf_vlm.modeling.blip2_flant5 import (
    Blip2FlanT5Config,
    Blip2FlanT5ForConditionalGeneration,
    Blip2FlanT5ForPretraining,
)
from hf_vlm.modeling.coca import CocaConfig, CocaModel

common = load_test_modeling_common()
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor


class ContrastiveLossLabels:
    """`return_loss=True` where the common tests ask for labels (test_training), as transformers' CLIP tester passes it."""

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:
            inputs_dict["return_loss"] = True
        return inputs_dict


class GenerationConformanceMixin:
    """What transformers' `GenerationTesterMixin` checks (its tests/generation/ is not in the sdist), for our generative
    classes: greedy decoding is the argmax of forward step by step; the cache changes nothing (greedy and beams);
    sampling is seeded; beams come sorted and one beam is greedy; padded batches equal one row at a time; a prompt
    as `inputs_embeds` equals it as ids; dict outputs carry the sequences, per-step scores / logits, attentions and
    hidden states. The tester supplies `generation_inputs(batch)` (pixel_values, a prompt and its mask, the prompt
    padded per its model's convention), `is_decoder_only` and `start_ids(batch)`."""

    max_new_tokens = 4

    def _model(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = self.all_generative_model_classes[0](config).eval()
        model.generation_config.eos_token_id = None  # every run makes max_new_tokens tokens
        model.generation_config.pad_token_id = config.get_text_config().pad_token_id
        return model

    def _new_tokens(self, sequences, inputs):
        return sequences[:, inputs["input_ids"].shape[1]:] if self.model_tester.is_decoder_only else sequences[:, 1:]

    @torch.no_grad()
    def test_greedy_generate_is_the_argmax_of_forward_step_by_step(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2, padded=False)
        generated = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        tokens = inputs["input_ids"] if self.model_tester.is_decoder_only else self.model_tester.start_ids(2)
        for _ in range(self.max_new_tokens):
            if self.model_tester.is_decoder_only:
                logits = model(input_ids=tokens, pixel_values=inputs["pixel_values"]).logits
            else:
                logits = model(**inputs, decoder_input_ids=tokens).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        torch.testing.assert_close(generated, tokens)

    @torch.no_grad()
    def test_cache_changes_nothing(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2)
        for settings in ({}, {"num_beams": 3}):
            cached = model.generate(**inputs, max_new_tokens=self.max_new_tokens, **settings)
            uncached = model.generate(**inputs, max_new_tokens=self.max_new_tokens, use_cache=False, **settings)
            torch.testing.assert_close(cached, uncached, msg=str(settings))

    @torch.no_grad()
    def test_sampling_is_seeded(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2)
        runs = []
        for seed in (1, 1, 2):
            torch.manual_seed(seed)
            runs.append(model.generate(**inputs, do_sample=True, top_k=50, max_new_tokens=8, num_return_sequences=2))
        assert runs[0].shape[0] == 4 and torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
        assert int(runs[0].max()) < model.config.get_text_config().vocab_size

    @torch.no_grad()
    def test_beam_search_returns_sorted_beams_and_one_beam_is_greedy(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2)
        beams = model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=3, num_return_sequences=3,
                               return_dict_in_generate=True, output_scores=True)
        assert beams.sequences.shape[0] == 6
        scores = beams.sequences_scores.view(2, 3)
        assert torch.all(scores[:, :-1] >= scores[:, 1:]), scores
        best = model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=3)
        torch.testing.assert_close(best, beams.sequences[::3])
        torch.testing.assert_close(model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=1),
                                   model.generate(**inputs, max_new_tokens=self.max_new_tokens))

    @torch.no_grad()
    def test_padded_batch_equals_one_row_at_a_time(self):
        """Left padding for the decoder-only model, right padding of the encoder's prompt for the encoder-decoder."""
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2, padded=True)
        assert (inputs["attention_mask"] == 0).any()
        together = self._new_tokens(model.generate(**inputs, max_new_tokens=self.max_new_tokens), inputs)
        for row in range(2):
            keep = inputs["attention_mask"][row].bool()
            alone = {"pixel_values": inputs["pixel_values"][row : row + 1],
                     "input_ids": inputs["input_ids"][row : row + 1, keep]}
            tokens = self._new_tokens(model.generate(**alone, max_new_tokens=self.max_new_tokens), alone)
            torch.testing.assert_close(together[row], tokens[0], msg=f"row {row}")

    @torch.no_grad()
    def test_prompt_as_inputs_embeds(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2)
        by_ids = self._new_tokens(model.generate(**inputs, max_new_tokens=self.max_new_tokens), inputs)
        prompt_embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
        by_embeds = model.generate(**inputs, inputs_embeds=prompt_embeds, max_new_tokens=self.max_new_tokens)
        torch.testing.assert_close(by_embeds if self.model_tester.is_decoder_only else by_embeds[:, 1:], by_ids)

    @torch.no_grad()
    def test_dict_outputs_with_scores_logits_attentions_and_hidden_states(self):
        model, inputs = self._model(), self.model_tester.generation_inputs(batch=2)
        model.set_attn_implementation("eager")  # attention probabilities, as transformers' generation tests ask
        plain = model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        for settings in ({}, {"num_beams": 2}):
            out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, return_dict_in_generate=True,
                                 output_scores=True, output_logits=True, output_attentions=True,
                                 output_hidden_states=True, **settings)
            rows = 2 * settings.get("num_beams", 1)
            if not settings:
                torch.testing.assert_close(out.sequences, plain)
            assert len(out.scores) == len(out.logits) == self.max_new_tokens
            vocab = model.config.get_text_config().vocab_size
            assert all(step.shape == (rows, vocab) for step in (*out.scores, *out.logits))
            if self.model_tester.is_decoder_only:
                steps_attentions, steps_hidden = out.attentions, out.hidden_states
            else:
                steps_attentions, steps_hidden = out.decoder_attentions, out.decoder_hidden_states
                assert len(out.encoder_attentions) == self.model_tester.num_hidden_layers
                assert len(out.cross_attentions) == self.max_new_tokens
            assert len(steps_attentions) == len(steps_hidden) == self.max_new_tokens
            layers = self.model_tester.num_hidden_layers
            assert all(len(step) == layers for step in steps_attentions)
            assert all(len(step) == layers + 1 for step in steps_hidden)
            # after the first step, one new query position attends to every position so far
            last = steps_attentions[-1][0]
            assert last.shape[0] == rows and last.shape[-2] == 1
            torch.testing.assert_close(last.sum(-1), torch.ones_like(last.sum(-1)))


class CompositeModelSkips:
    """The common tests transformers itself skips for its composite models (CLIPModel, BLIP-2, InstructBLIP), with
    its reasons. Each tower's hidden states and attentions are checked by the common `test_get_*_features_*` tests,
    and the forward's nested outputs by our own tests below."""

    @unittest.skip(reason="Hidden_states is tested in individual model tests")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="Retain_grad is tested in individual model tests")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(
        reason="Attentions are tested in individual model tests (CLIPModel and BLIP-2 set test_attention_outputs = "
        "False: a composite model has one attentions tuple per tower)"
    )
    def test_attention_outputs(self):
        pass


def _right_padded_mask(batch: int, length: int) -> torch.Tensor:
    """Every row keeps at least its first 3 tokens; later rows lose some at the end (right padding)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, length - row % (length - 2) :] = 0 if row % (length - 2) else 1
    return mask


# ------------------------------------------------------------------------------------------------------------- CoCa
class CocaModelTester:
    def __init__(self, parent, batch_size=3, seq_length=7, image_size=16, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=99):
        self.parent = parent
        self.batch_size, self.seq_length, self.image_size = batch_size, seq_length, image_size
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, num_attention_heads
        self.vocab_size = vocab_size
        self.is_training = True
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 3, 1, 0

    def get_config(self) -> CocaConfig:
        layers = dict(hidden_size=self.hidden_size, intermediate_size=37, num_hidden_layers=self.num_hidden_layers,
                      num_attention_heads=self.num_attention_heads)
        return CocaConfig(
            vision_config=dict(
                timm_model_name="vit_base_patch32_clip_224",
                timm_model_args=dict(patch_size=8, embed_dim=32, depth=self.num_hidden_layers, num_heads=4,
                                     final_norm=False),
                image_size=self.image_size, num_pooler_queries=4, pooler_num_attention_heads=4,
                separate_contrastive_query=True,
            ),
            text_config=dict(vocab_size=self.vocab_size, max_position_embeddings=20, pad_token_id=self.pad_token_id,
                             bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, **layers),
            multimodal_config=layers,
            projection_dim=16,
            # logit scale 1 (not 1/0.07): eager-vs-SDPA compares logits_per_text with absolute tolerances, which a
            # 14x temperature would scale past fp16's resolution
            logit_scale_init_value=0.0,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size).clamp(min=4)
        input_ids[:, 0] = self.bos_token_id
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        inputs = {"input_ids": input_ids, "attention_mask": _right_padded_mask(self.batch_size, self.seq_length),
                  "pixel_values": pixel_values}
        return self.get_config(), inputs

    is_decoder_only = True

    def generation_inputs(self, batch: int, padded: bool = True) -> dict:
        """Images and caption prompts (start token + text); `padded`: the second one two tokens shorter, left-padded."""
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(4, self.vocab_size, (batch, 4), generator=generator)
        input_ids[:, 0] = self.bos_token_id
        attention_mask = torch.ones_like(input_ids)
        if padded:
            input_ids[1] = torch.cat([torch.full((2,), self.pad_token_id), input_ids[1, :2]])
            attention_mask[1, :2] = 0
        pixel_values = torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


class CocaModelTest(ContrastiveLossLabels, CompositeModelSkips, GenerationConformanceMixin, ModelTesterMixin,
                    GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (CocaModel,)
    additional_model_inputs = ["pixel_values"]  # as transformers' CLIPModelTest
    _is_composite = True
    # get_image_features' last_hidden_state holds the image tokens the decoder reads: the attentional pooler's
    # outputs, as wide as the decoder, not the trunk (the vision config has no width of its own; timm's model has it)
    skip_test_image_features_output_shape = True

    @unittest.skip(reason="CoCa is not a base model with a head on top: the caption head reads the multimodal decoder, "
                          "which continues the text encoder (the test's docstring: skip for a special architecture)")
    def test_model_base_model_prefix(self):
        pass

    def setUp(self):
        self.model_tester = CocaModelTester(self)


# ---------------------------------------------------------------------------------------------------------- BLIP-2
class Blip2FlanT5ModelTester:
    """Stage 2 (`stage=2`: T5 inputs) or stage 1 (`stage=1`: Q-Former text inputs)."""

    def __init__(self, parent, stage: int, batch_size=3, encoder_seq_length=7, decoder_seq_length=5, image_size=16,
                 hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=99, num_query_tokens=4):
        self.parent, self.stage = parent, stage
        self.batch_size, self.encoder_seq_length, self.decoder_seq_length = batch_size, encoder_seq_length, decoder_seq_length
        self.seq_length = decoder_seq_length if stage == 2 else encoder_seq_length
        self.image_size, self.hidden_size = image_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.vocab_size, self.num_query_tokens = vocab_size, num_query_tokens
        self.is_training = True

    def get_config(self) -> Blip2FlanT5Config:
        return Blip2FlanT5Config(
            vision_config=dict(image_size=self.image_size, patch_size=8, hidden_size=32,
                               num_hidden_layers=self.num_hidden_layers, num_attention_heads=4, intermediate_size=64),
            qformer_config=dict(vocab_size=self.vocab_size, dec_token_id=self.vocab_size - 1, hidden_size=self.hidden_size,
                                num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                                intermediate_size=37, max_position_embeddings=32),
            text_config=dict(model_type="t5", vocab_size=self.vocab_size, d_model=self.hidden_size, d_kv=8, d_ff=37,
                             num_layers=self.num_hidden_layers, num_decoder_layers=self.num_hidden_layers,
                             num_heads=self.num_attention_heads, feed_forward_proj="gated-gelu",
                             tie_word_embeddings=False, relative_attention_num_buckets=8,
                             pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
            num_query_tokens=self.num_query_tokens,
            image_text_hidden_size=16,
        )

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        input_ids = ids_tensor([self.batch_size, self.encoder_seq_length], self.vocab_size - 1).clamp(min=2)
        attention_mask = _right_padded_mask(self.batch_size, self.encoder_seq_length)
        inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
        if self.stage == 2:
            inputs["decoder_input_ids"] = ids_tensor([self.batch_size, self.decoder_seq_length], self.vocab_size)
            inputs["decoder_attention_mask"] = _right_padded_mask(self.batch_size, self.decoder_seq_length)
        return self.get_config(), inputs

    is_decoder_only = False

    def generation_inputs(self, batch: int, padded: bool = True) -> dict:
        """Images and T5 prompts ending in </s>; `padded`: the second one two tokens shorter, right-padded."""
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(2, self.vocab_size, (batch, 5), generator=generator)
        input_ids[:, -1] = 1
        attention_mask = torch.ones_like(input_ids)
        if padded:
            input_ids[1, 2], input_ids[1, 3:] = 1, 0
            attention_mask[1, 3:] = 0
        pixel_values = torch.randn(batch, 3, self.image_size, self.image_size, generator=generator)
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}

    def start_ids(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1, dtype=torch.long)  # T5's decoder_start_token_id


class Blip2FlanT5ForConditionalGenerationTest(CompositeModelSkips, GenerationConformanceMixin, ModelTesterMixin,
                                              GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (Blip2FlanT5ForConditionalGeneration,)
    additional_model_inputs = ["input_ids"]
    _is_composite = True
    is_encoder_decoder = True

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels)
        if return_labels:  # T5 targets (transformers' BLIP-2 testers pass them as `labels`)
            inputs_dict["labels"] = inputs_dict["decoder_input_ids"].flip(-1).clone()
        return inputs_dict

    @unittest.skip(reason="BLIP-2 is not a base model with a head on top: the T5 language model is a whole "
                          "T5ForConditionalGeneration (the test's docstring: skip for a special architecture)")
    def test_model_base_model_prefix(self):
        pass

    def setUp(self):
        self.model_tester = Blip2FlanT5ModelTester(self, stage=2)


class Blip2FlanT5ForPretrainingTest(ContrastiveLossLabels, CompositeModelSkips, ModelTesterMixin, unittest.TestCase):
    all_model_classes = (Blip2FlanT5ForPretraining,)
    additional_model_inputs = ["input_ids"]
    _is_composite = True
    # As transformers' CLIPModelTest: the resize tests read the vocabulary from `config.get_text_config()`, which is
    # T5's here, while stage 1's embeddings are the Q-Former's (test_blip2_modeling.py resizes and reloads them).
    test_resize_embeddings = False

    def setUp(self):
        self.model_tester = Blip2FlanT5ModelTester(self, stage=1)
