"""PreferencePolicy on real tiny models: every way of scoring views gives the log-probs of the plain
sequence (prompt + response) scored alone; reference strategies; dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from lightning_meddpo.backbones.adapter import adapter_for
from lightning_meddpo.backbones.loader import load_model, load_processor
from lightning_meddpo.data.batch import IGNORE_INDEX
from lightning_meddpo.data.collate import PairEncoder, PreferenceCollator
from lightning_meddpo.data.datamodule import PreferenceDataset
from lightning_meddpo.data.records import read_preference_file
from lightning_meddpo.policy import VIEWS, PreferencePolicy, token_logps

ALL_VIEWS = ("chosen", "rejected", "chosen_mprime", "rejected_mprime")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook oracle: summed log-probs of the labelled (response) tokens of full-sequence logits, and
    their count (what every scoring mode must reproduce)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return token_logps(logits, labels, mask), mask.sum(-1)


def encode(records, processor, max_length=256, corruption=None):
    dataset = PreferenceDataset(records, PairEncoder(processor, max_length), corruption=corruption)
    return PreferenceCollator(processor.tokenizer.pad_token_id)([dataset[i] for i in range(len(records))])


@pytest.fixture(scope="module")
def batch(demo_dir, tiny_processor):
    records, _ = read_preference_file(demo_dir / "train.json")
    return encode(records[:3], tiny_processor)


def alone(model, batch, view: str, row: int) -> torch.Tensor:
    """The log-prob of one view of one pair from its plain sequence alone: no padding, no packing,
    the model's own forward and full logits. The reference answer for every fast path."""
    response_side, image_side = VIEWS[view]
    prompt = batch.prompt_for(image_side).row(row)
    response = getattr(batch, response_side).row(row)["input_ids"]
    ids = torch.cat([prompt["input_ids"], response])[None]
    extra = {k: torch.cat([v, torch.zeros_like(response)])[None] for k, v in prompt.items() if k != "input_ids"}
    images = getattr(batch, image_side).select([row])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=images.pixel_values,
                   **images.extra, **extra).logits
    labels = torch.cat([torch.full_like(prompt["input_ids"], IGNORE_INDEX), response])[None]
    return sequence_logps(logits, labels)[0][0]


def check_every_mode(model, batch, views=ALL_VIEWS) -> dict[str, torch.Tensor]:
    policy = PreferencePolicy(model, reference="none")
    results = {}
    for mode in ("packed", "rows", "logits"):
        policy.requested_mode = mode
        assert policy.mode_for(policy.model) == mode
        results[mode] = policy.logps(batch, views)
    for view in views:
        expected = torch.stack([alone(policy.model, batch, view, row) for row in range(len(batch))])
        for mode, logps in results.items():
            torch.testing.assert_close(logps[view], expected, atol=1e-5, rtol=1e-6, msg=f"{mode} {view}")
    return results["packed"]


def test_every_mode_equals_each_view_scored_alone(batch):
    logps = check_every_mode(load_model("tiny://llama"), batch)
    assert not torch.allclose(logps["chosen"], logps["chosen_mprime"])  # m' really changes the score
    assert len({int(n) for n in batch.chosen.lengths} | {int(n) for n in batch.rejected.lengths}) > 1  # padding


@pytest.mark.parametrize("views", [("chosen", "rejected"), ("chosen", "chosen_mprime"), ("chosen", "rejected_mprime"),
                                   ("chosen", "rejected", "chosen_mprime"), ("chosen",)])
def test_view_sets_of_every_formulation(batch, views):
    check_every_mode(load_model("tiny://llama"), batch, views)


def test_truncated_responses(demo_dir, tiny_processor, batch):
    records, _ = read_preference_file(demo_dir / "train.json")
    max_length = int(batch.prompt.lengths.max()) + 3
    short = encode(records[:3], tiny_processor, max_length=max_length)
    assert ((short.prompt.lengths + short.chosen.lengths) <= max_length).all()
    assert (short.chosen.lengths < batch.chosen.lengths).any() and (short.chosen.lengths > 0).all()
    check_every_mode(load_model("tiny://llama"), short)


def test_qwen2_vl_with_an_mprime_of_another_shape(demo_dir):
    """Qwen2-VL: the image token count follows the image size, so m' (a crop of another aspect ratio) has
    a prompt of its own; 3-D rope positions restart after the prompt for each packed response."""
    processor = load_processor("tiny://qwen2_vl")
    records, _ = read_preference_file(demo_dir / "train.json")
    wide = demo_dir / "wide_crop.png"
    Image.open(records[0].rejected_image).crop((0, 8, 32, 24)).resize((64, 32)).save(wide)
    records = [dataclasses.replace(r, rejected_image=wide) for r in records[:3]]
    batch = encode(records, processor, max_length=512)
    assert batch.prompt_mprime is not None  # m' expanded to another number of image tokens
    assert not torch.equal(batch.prompt_mprime.lengths, batch.prompt.lengths)
    check_every_mode(load_model("tiny://qwen2_vl"), batch)


def test_sequence_logps_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]]))
    labels = torch.tensor([[-100, 2, 1]])  # position 0 is prompt; tokens 2 then 1 are scored
    logps, n = sequence_logps(logits, labels)
    torch.testing.assert_close(logps, torch.log(torch.tensor([0.25 * 0.2])))
    assert int(n) == 2


def test_gradients_match_the_plain_path(batch):
    """Packing shares the prompt: its gradient is the sum of what both responses send it."""
    grads = {}
    for mode in ("packed", "logits"):
        policy = PreferencePolicy(load_model("tiny://llama"), reference="none", mode=mode)
        logps = policy.logps(batch, ("chosen", "rejected", "chosen_mprime"))
        (logps["chosen"].sum() - 0.5 * logps["rejected"].sum() + 0.3 * logps["chosen_mprime"].sum()).backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["packed"], grads["logits"], atol=1e-5, rtol=1e-4)


def test_reference_reuses_the_policy_image_features_only_when_vision_is_frozen(batch):
    model = load_model("tiny://llama")
    calls = []
    policy = PreferencePolicy(model, reference="copy")
    for m in (policy.model, policy.reference):
        m.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    policy.logps(batch, ALL_VIEWS)
    policy.reference_logps(batch, ALL_VIEWS)
    assert len(calls) == 4  # m and m', once each, for the policy and once each for the reference
    for p in [*policy.model.model.vision_tower.parameters(), *policy.model.model.multi_modal_projector.parameters()]:
        p.requires_grad_(False)
    calls.clear()
    ref = policy.reference_logps(batch, ALL_VIEWS)
    policy.logps(batch, ALL_VIEWS)
    again = policy.reference_logps(batch, ALL_VIEWS)
    assert len(calls) == 2  # encoded once for both models
    torch.testing.assert_close(ref["chosen_mprime"], again["chosen_mprime"])
    other = dataclasses.replace(batch, images=dataclasses.replace(batch.images, pixel_values=batch.images.pixel_values.flip(-1)))
    policy.logps(other, ("chosen",))
    assert len(calls) == 3  # other images: encoded again, never a stale cache


@pytest.mark.parametrize("strategy", ["copy", "adapter"])
def test_reference_runs_under_inference_mode_and_returns_ordinary_tensors(batch, strategy):
    """The online reference records no autograd graph (inference_mode), and what it returns can enter a loss that
    saves it for its backward; its features, when shared, stay usable by the policy."""
    from lightning_meddpo.backbones.build import LoraSettings, prepare_policy_model

    model = load_model("tiny://llama")
    if strategy == "adapter":
        model = prepare_policy_model(model, LoraSettings(r=4), ["vision_tower", "projector"], False)
    policy = PreferencePolicy(model, reference=strategy)
    seen = []
    reference = policy.reference if strategy == "copy" else policy.model
    adapter_for(reference).core(reference).language_model.register_forward_hook(
        lambda *a: seen.append(torch.is_inference_mode_enabled()))
    views = ("chosen", "rejected")
    ref = policy.reference_logps(batch, views)
    assert seen == [True] and not any(t.is_inference() or t.requires_grad for t in ref.values())
    logps = policy.logps(batch, views)
    (logps["chosen"] * ref["chosen"] - logps["rejected"] * ref["rejected"]).sum().backward()  # ref saved for backward
    assert any(p.grad is not None for p in policy.model.parameters() if p.requires_grad)


def test_block_mask_is_the_block_rule_and_is_built_once_per_step(batch, monkeypatch):
    """Token i sees token j iff j <= i and j is on the prompt or in i's own segment (padding sees only itself);
    the policy and the reference of one step share the rows and the mask; a new batch gets new ones."""
    from lightning_meddpo.data import rows as rows_module

    rows = rows_module.build_rows(batch, ALL_VIEWS, packed=True)
    mask = rows.block_mask(torch.float32)
    seg = rows.segment_ids.tolist()
    for r, segments in enumerate(seg):
        expected = torch.tensor([[j == i or (0 <= segments[j] and j <= i and segments[j] in (0, segments[i]))
                                  for j in range(len(segments))] for i in range(len(segments))])
        assert torch.equal(mask[r, 0] == 0, expected)
        assert (mask[r, 0][~expected] == torch.finfo(torch.float32).min).all()
    assert rows.block_mask(torch.float32) is mask and rows.block_mask(torch.bfloat16).dtype == torch.bfloat16

    built = []
    monkeypatch.setattr("lightning_meddpo.policy.build_rows",
                        lambda *a, **k: built.append(1) or rows_module.build_rows(*a, **k))
    policy = PreferencePolicy(load_model("tiny://llama"), reference="copy")
    policy.score(batch, ("chosen", "rejected"))
    assert len(built) == 1
    policy.score(dataclasses.replace(batch, prompt=dataclasses.replace(batch.prompt, input_ids=batch.prompt.input_ids.clone())),
                 ("chosen", "rejected"))
    assert len(built) == 2


def test_copy_reference_is_frozen_and_starts_equal(batch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="copy")
    assert all(not p.requires_grad for p in policy.reference.parameters())
    views = ("chosen", "rejected")
    torch.testing.assert_close(policy.logps(batch, views)["chosen"], policy.reference_logps(batch, views)["chosen"])
    before = policy.reference_logps(batch, views)["chosen"].clone()
    optimizer = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=0.01)
    (-policy.logps(batch, views)["chosen"].sum()).backward()
    optimizer.step()
    policy.train()
    assert not policy.reference.training and policy.model.training
    torch.testing.assert_close(policy.reference_logps(batch, views)["chosen"], before)  # reference unchanged
    assert (policy.logps(batch, views)["chosen"] > before).all()  # the policy moved


def test_reference_none_and_adapter_without_lora_are_errors(batch):
    policy = PreferencePolicy(load_model("tiny://llama"), reference="none")
    assert policy.reference is None
    with pytest.raises(ValueError, match="no reference"):
        policy.reference_logps(batch, ("chosen",))
    with pytest.raises(ValueError, match="LoRA"):
        PreferencePolicy(load_model("tiny://llama"), reference="adapter")


def test_flash_attention_falls_back_to_rows_with_a_reason(batch, caplog):
    model = load_model("tiny://llama")
    model.config.text_config._attn_implementation = "flash_attention_2"
    policy = PreferencePolicy(model, reference="none")
    with caplog.at_level("WARNING"):
        assert policy.mode_for(policy.model) == "rows"
    assert "flash_attention_2" in caplog.text and "block mask" in caplog.text


def test_dropout_is_off_by_default():
    model = load_model("tiny://llama")
    model.config.text_config.attention_dropout = 0.3
    policy = PreferencePolicy(model, reference="none")
    assert policy.model.config.text_config.attention_dropout == 0.0
    assert all(m.p == 0.0 for m in policy.model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_chunked_log_probs_equal_the_one_call_path_with_their_gradients(batch, chunk):
    views = ("chosen", "rejected", "chosen_mprime")
    results = {}
    for name, size in (("one call", None), ("chunked", chunk)):
        policy = PreferencePolicy(load_model("tiny://llama"), reference="none", logp_chunk=size)
        logps = policy.logps(batch, views)
        (logps["chosen"].sum() - 0.5 * logps["rejected"].sum() + 0.3 * logps["chosen_mprime"].sum()).backward()
        results[name] = logps, torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
    torch.testing.assert_close(results["chunked"][0], results["one call"][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(results["chunked"][1], results["one call"][1], atol=1e-5, rtol=1e-4)


def test_chunked_log_probs_keep_no_tokens_by_vocabulary_tensor_for_the_backward():
    """What autograd keeps for the backward: with chunks, nothing of the [tokens, vocabulary] logits (they are
    recomputed per chunk); in one call, the float32 logits themselves."""
    from lightning_meddpo.policy import chunked_token_logps

    torch.manual_seed(0)
    tokens, hidden, vocab = 300, 16, 1000
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(tokens, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))

    def largest_saved(chunk):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = chunked_token_logps(head, states, targets, chunk)
        out.sum().backward()
        return max(sizes), out

    one_call, expected = largest_saved(None)
    chunked, got = largest_saved(32)
    assert one_call >= tokens * vocab and chunked <= max(tokens * hidden, vocab * hidden)
    torch.testing.assert_close(got, expected)
    by_hand = torch.log_softmax(head(states).double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), by_hand, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["tiny://llama", "tiny://qwen2_vl"])
def test_activation_checkpointing_per_layer_gives_the_same_log_probs_and_gradients(demo_dir, batch, backbone):
    """gradient_checkpointing: true recomputes each decoder (and vision) layer in the backward: every layer runs
    twice per step, and log-probs and gradients equal the plain path's, for both backbone families."""
    from lightning_meddpo.backbones.build import build_policy_model

    if backbone != "tiny://llama":
        records, _ = read_preference_file(demo_dir / "train.json")
        batch = encode(records[:3], load_processor(backbone), max_length=512)
    views = ("chosen", "rejected", "chosen_mprime")
    results = {}
    for checkpointed in (False, True):
        policy = PreferencePolicy(build_policy_model(backbone, gradient_checkpointing=checkpointed), reference="none")
        layers = [m for m in policy.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        calls = []
        for layer in layers:  # inside: transformers checkpoints `forward`, so the layer's own hooks run once
            layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # (a recompute stops after what it needs)
        logps = policy.logps(batch, views)
        (logps["chosen"].sum() - 0.5 * logps["rejected"].sum() + 0.3 * logps["chosen_mprime"].sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        results[checkpointed] = logps, grads, len(calls) / len(layers)
    assert results[False][2] == 1 and results[True][2] == 2  # each layer forwarded again in the backward
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-5)
