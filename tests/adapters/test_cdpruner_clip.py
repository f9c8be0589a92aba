"""CDPruner's paper-exact option (``clip=``) against the authors' ``encode_images``, written out here
step by step from ../shared/golden/README-cdpruner-dart.md (CDPruner at 9541616), sharing no code
with vispruner: CLIP's visual projection of the post-layernormed patch features against CLIP's text
embeddings of the question's 77-token segments, their relevance and their greedy MAP loop."""

from __future__ import annotations

import pytest
import torch

import vispruner
from tests.tiny_models import tiny_clip, tiny_clip_tokenizer, tiny_llava
from tests.tiny_qwen import BUILDERS as QWEN_BUILDERS

from .cases import FAMILIES, model_and_inputs
from .reference import _crops

NUM_TOKENS = 5
#: One question per row of TEXTS; the second has 200 CLIP tokens (M = 3 segments of 77).
QUESTIONS = ["What colour is the square on the left?", "where " * 40]


def clip_inputs(clip, tokenizer, question: str):
    """The authors' ``CLIPVisionTower.forward`` text side: (M, E) ``text_embeds``."""
    encoded = tokenizer(text=question, return_tensors="pt")
    length = clip.config.text_config.max_position_embeddings
    segments = (encoded["input_ids"].shape[1] - 1) // length + 1
    padding = length * segments - encoded["input_ids"].shape[1]
    padded = {
        name: torch.cat([value, value.new_zeros((value.shape[0], padding))], dim=1).reshape(-1, length)
        for name, value in encoded.items()
    }
    with torch.no_grad():
        return clip.get_text_features(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).pooler_output


def authors_keep(model, clip, text_embeds, crops, num_tokens):
    """The authors' ``encode_images`` on the crops of one image (one call): (crops, N) keep."""
    tower = model.model.vision_tower
    with torch.no_grad():
        patches = tower(crops, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
        image_features = model.model.multi_modal_projector(patches)
        image_embeds = clip.visual_projection(tower.post_layernorm(patches).float())
    batch, tokens, _ = image_features.shape
    image_normalized = (image_features / image_features.norm(dim=-1, keepdim=True)).float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-torch.matmul(image_embeds, text_embeds.t())).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    rows = torch.arange(batch)
    cis = torch.zeros((num_tokens, batch, tokens))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select = torch.empty((num_tokens, batch), dtype=torch.long)
    for i in range(num_tokens):
        j = torch.argmax(di2s, dim=-1)
        select[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    keep = torch.zeros(batch, tokens, dtype=torch.bool)
    keep.scatter_(1, torch.sort(select.t()).values, True)
    assert int(keep.sum()) == batch * num_tokens  # no degenerate input: theirs kept T per crop
    return keep


def expected_keeps(model, clip, tokenizer, inputs, questions, num_tokens):
    """Per image, in order: the authors' mask with its row's question."""
    image_id = model.config.image_token_id
    crops = _crops(model, inputs["pixel_values"], inputs.get("image_sizes"))
    keeps, image = [], 0
    for ids, question in zip(inputs["input_ids"], questions):
        text_embeds = clip_inputs(clip, tokenizer, question)
        for _ in range(int(((ids == image_id) & (torch.roll(ids, 1) != image_id)).sum())):
            keeps.append(authors_keep(model, clip, text_embeds, crops[image], num_tokens))
            image += 1
    assert image == len(crops)
    return keeps


def test_the_long_question_has_several_segments():
    model = tiny_llava()
    assert [len(clip_inputs(tiny_clip(model), tiny_clip_tokenizer(), q)) for q in QUESTIONS] == [1, 3]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [{}, {"num_beams": 2, "num_return_sequences": 2}])
def test_generate_keeps_the_authors_tokens(family, options):
    # A batch of two rows, the second with two images; LLaVA-NeXT: 1x2, 2x1 and 2x2 crop grids.
    model, inputs = model_and_inputs(family)
    clip, tokenizer = tiny_clip(model), tiny_clip_tokenizer()
    expected = expected_keeps(model, clip, tokenizer, inputs, QUESTIONS, NUM_TOKENS)
    vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=(clip, tokenizer))
    with vispruner.instructions(model, QUESTIONS):
        model.generate(**inputs, max_new_tokens=2, do_sample=False, **options)
    selections = [selection.keep for selection in vispruner.last_selection(model)]
    if options:  # beams: the model's forward sees each row's images once per copy
        expected = expected[:1] * 2 + expected[1:] * 2
    assert len(selections) == len(expected)
    for keep, reference in zip(selections, expected):
        assert torch.equal(keep, reference)
    variant = model_and_inputs(family)[0]
    vispruner.apply(variant, NUM_TOKENS, method="cdpruner")
    variant.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert any(not torch.equal(a.keep, b) for a, b in zip(vispruner.last_selection(variant), expected))


def test_forward_and_a_checkpoint_path(tmp_path):
    model, inputs = model_and_inputs("llava", texts=["w1 <image> w2"])
    clip, tokenizer = tiny_clip(model), tiny_clip_tokenizer()
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = expected_keeps(model, clip, tokenizer, inputs, ["is it red"], NUM_TOKENS)
    for given in (str(tmp_path), tmp_path, clip):  # a saved CLIPModel finds its tokenizer by name_or_path
        loaded = clip if given is clip else None
        if loaded is not None:
            loaded.name_or_path = str(tmp_path)
        vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=given)
        with vispruner.instructions(model, ["is it red"]), torch.no_grad():
            model(**inputs)
        assert torch.equal(vispruner.last_selection(model)[0].keep, expected[0])


def test_the_question_decides():
    model, inputs = model_and_inputs("llava", texts=["w1 <image> w2"])
    vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=(tiny_clip(model), tiny_clip_tokenizer()))
    picks = set()
    for question in ("red", "where is the blue circle", "count the squares", "left or right?"):
        with vispruner.instructions(model, [question]), torch.no_grad():
            model(**inputs)
        picks.add(tuple(vispruner.last_selection(model)[0].keep.flatten().tolist()))
    assert len(picks) > 1


def test_missing_or_miscounted_questions_are_refused():
    model, inputs = model_and_inputs("llava")
    vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=(tiny_clip(model), tiny_clip_tokenizer()))
    with pytest.raises(ValueError, match=r"vispruner.instructions\(model, questions\).*\(2\); got none"):
        model.generate(**inputs, max_new_tokens=1)
    with pytest.raises(ValueError, match=r"\(2\); got 1"), vispruner.instructions(model, ["one"]):
        model.generate(**inputs, max_new_tokens=1)
    for wrong in ("one", 3, ["one", None]):
        with pytest.raises(ValueError, match="texts must be a sequence of strings"), vispruner.instructions(model, wrong):
            pass
    with vispruner.instructions(model, (text for text in QUESTIONS)):  # any iterable, read once
        model.generate(**inputs, max_new_tokens=1)
    with vispruner.instructions(tiny_llava(), ["one"]) as unpatched:  # nothing to give them to
        assert not hasattr(unpatched, "_vispruner")


def test_wrong_families_dims_and_values_are_refused():
    model = tiny_llava()
    tokenizer = tiny_clip_tokenizer()
    qwen = QWEN_BUILDERS["qwen2_5_vl"]()
    with pytest.raises(ValueError, match=r"clip is for the families with a CLIP vision tower \(LLaVA-1.5, LLaVA-NeXT\)"):
        vispruner.apply(qwen, NUM_TOKENS, method="cdpruner", clip=(tiny_clip(model), tokenizer))
    for field, value in (("hidden_size", 48), ("image_size", 64), ("patch_size", 8)):
        with pytest.raises(ValueError, match=f"clip must be the CLIP model of the LLaVA vision tower.*{field}={value}"):
            vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=(tiny_clip(model, **{field: value}), tokenizer))
    with pytest.raises(ValueError, match=r"pass clip=\(model, tokenizer\)"):
        vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=tiny_clip(model))
    with pytest.raises(ValueError, match="clip must be a transformers.CLIPModel"):
        vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip=model)
    with pytest.raises(ValueError, match="clip: could not load a CLIP model"):
        vispruner.apply(model, NUM_TOKENS, method="cdpruner", clip="/nonexistent/clip")
    with pytest.raises(ValueError, match="got unknown option"):
        vispruner.apply(model, NUM_TOKENS, method="vispruner", clip=(tiny_clip(model), tokenizer))
    assert not hasattr(model, "_vispruner")  # nothing was installed by a refused apply
