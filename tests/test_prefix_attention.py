"""attention.prefix_sdpa: packed rows' attention as a causal pass and a correction equals SDPA under the full block
mask (values and gradients), the policy takes it for sdpa models and builds no [L, L] mask, and without a layout the
implementation is plain sdpa (generation, saved configs)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from torch.nn import functional as F

from lightning_meddpo.attention import NAME, prefix_layout, prefix_sdpa, use_prefix_attention, uses_prefix_attention
from lightning_meddpo.backbones.adapter import adapter_for
from lightning_meddpo.backbones.loader import load_model
from lightning_meddpo.data.records import read_preference_file
from lightning_meddpo.data.rows import Rows, build_rows
from lightning_meddpo.policy import PreferencePolicy
from tests.test_policy import encode

# rows of [prompt | responses ...] with padding: 3 responses, 2, 1 (nothing to correct), 2 with a long second
SEGMENTS = [
    [0, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3, -1, -1],
    [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, -1],
    [0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1],
    [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2],
]


@pytest.fixture(scope="module")
def batch(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    return encode(records[:3], tiny_processor)


def block_rule(segments: torch.Tensor) -> torch.Tensor:
    """Token i sees j iff j <= i and j is on the prompt or in i's own response (padding: itself), written out."""
    rows, n = segments.shape
    return torch.tensor([[[j == i or (segments[r, j] >= 0 and j <= i and int(segments[r, j]) in (0, int(segments[r, i])))
                           for j in range(n)] for i in range(n)] for r in range(rows)])


def test_layout_says_where_later_responses_look():
    segments = torch.tensor(SEGMENTS)
    layout = prefix_layout(segments)
    later = [[p for p, s in enumerate(row) if s >= 2] for row in SEGMENTS]
    assert layout.queries.shape == (4, max(map(len, later)))
    for r, positions in enumerate(later):
        assert layout.queries[r][layout.valid[r]].tolist() == positions
    rule = block_rule(segments)
    torch.testing.assert_close(layout.mask[:, 0][layout.valid], rule[layout.rows, layout.positions])
    assert list(zip(layout.rows.tolist(), layout.positions.tolist())) == [(r, p) for r, ps in enumerate(later) for p in ps]


def test_rows_make_the_layout_once_with_the_rows_segments(batch):
    rows = build_rows(batch, ("chosen", "rejected", "chosen_mprime"), packed=True)
    layout = rows.prefix_layout()
    assert rows.prefix_layout() is layout
    assert (rows.segment_ids[layout.rows, layout.positions] == 2).all()  # the rejected responses on m only
    assert int((rows.segment_ids == 2).sum()) == layout.positions.numel()


@pytest.mark.parametrize("groups", [1, 2])  # heads per key/value head: MHA and GQA
def test_prefix_sdpa_equals_sdpa_under_the_block_mask_with_gradients(groups):
    torch.manual_seed(0)
    segments = torch.tensor(SEGMENTS)
    rows, n, heads, dim = *segments.shape, 4, 8
    valid = segments >= 0
    query = torch.randn(rows, heads, n, dim, requires_grad=True)
    key, value = (torch.randn(rows, heads // groups, n, dim, requires_grad=True) for _ in range(2))
    module = types.SimpleNamespace(is_causal=True, num_key_value_groups=groups, training=False)
    layout = prefix_layout(segments)

    ours, _ = prefix_sdpa(module, query, key, value, layout.mask, prefix_layout=layout, scaling=dim**-0.5)
    mask = block_rule(segments)[:, None]
    expected = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                              attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(ours[valid], expected[valid], atol=1e-6, rtol=1e-5)
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((ours[valid] * weights[valid]).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected[valid] * weights[valid]).sum(), (query, key, value))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_policy_switches_sdpa_models_and_scores_without_an_L_by_L_mask(batch, monkeypatch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="copy")
    for model in (policy.model, policy.reference):
        assert uses_prefix_attention(adapter_for(model).text_config(model))
        assert adapter_for(model).text_config(model) is model.model.language_model.config  # what the layers read
    assert model.config.vision_config._attn_implementation == "sdpa"  # the vision tower is left alone
    monkeypatch.setattr(Rows, "block_mask", lambda self, dtype: pytest.fail("a packed row's [L, L] mask was built"))
    seen = []
    original = prefix_sdpa

    def spy(*args, prefix_layout=None, **kwargs):
        seen.append(prefix_layout is not None)
        return original(*args, prefix_layout=prefix_layout, **kwargs)

    from transformers import AttentionInterface

    AttentionInterface.register(NAME, spy)
    try:
        scores = policy.score(batch, ("chosen", "rejected"))
    finally:
        AttentionInterface.register(NAME, original)
    assert seen and all(seen)  # every language-model layer got the layout, policy and reference
    assert torch.isfinite(scores.policy["chosen"]).all()


def test_eager_models_keep_the_block_mask(batch):
    model = load_model("tiny://llama")
    model.config.text_config._attn_implementation = "eager"
    policy = PreferencePolicy(model, reference="none")
    assert not uses_prefix_attention(model.config.text_config)
    packed = policy.logps(batch, ("chosen", "rejected"))
    assert policy._last_rows[3]._masks  # the block mask it scored with
    policy.requested_mode = "rows"
    for view, logps in policy.logps(batch, ("chosen", "rejected")).items():
        torch.testing.assert_close(packed[view], logps, atol=1e-5, rtol=1e-6)


def test_without_a_layout_it_is_sdpa_and_is_not_saved(batch, tmp_path):
    sdpa = load_model("tiny://llama")
    switched = load_model("tiny://llama")
    assert use_prefix_attention(switched.config.text_config)
    ids = batch.chosen.input_ids.clone()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding: sdpa's padding mask must still apply
    text_sdpa, text_switched = (m.model.language_model for m in (sdpa, switched))
    torch.testing.assert_close(text_switched(input_ids=ids, attention_mask=mask).last_hidden_state,
                               text_sdpa(input_ids=ids, attention_mask=mask).last_hidden_state, atol=0, rtol=0)
    prompt = batch.prompt.input_ids[:1, : int(batch.prompt.lengths[0])]
    generated = [m.generate(input_ids=prompt, pixel_values=batch.images.pixel_values[:1], max_new_tokens=4, do_sample=False)
                 for m in (sdpa, switched)]
    assert torch.equal(*generated)
    switched.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    assert load_model(str(tmp_path)).config.text_config._attn_implementation == "sdpa"


