"""timm:<name> and hf:<config> models, the tokens data, and users' own tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from eqcore.errors import EQError
from eqcore.models.hf_zoo import ImageLogits, TextLogits
from eqcore.models.loaders import get_loaders, tensor_loaders
from eqcore.models.specs import InputSpec
from eqcore.models.tokens import TokenSpec, token_ids, tokens_loader
from eqcore.models.zoo import get_model

SMALL_BERT = {
    "model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64, "num_labels": 3,
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_timm_model_is_seeded_and_gets_its_spec_from_timm() -> None:
    first, again = get_model("timm:test_vit", seed=1), get_model("timm:test_vit", seed=1)
    other = get_model("timm:test_vit", seed=2)
    assert first.name == "timm:test_vit" and first.weights == "none"
    assert isinstance(first.spec, InputSpec) and first.spec.default_data == "samples"
    import timm

    config = timm.data.resolve_data_config({}, model=first.model)
    assert first.spec.shape == tuple(config["input_size"]) and first.spec.mean == tuple(config["mean"])
    a, b, c = _state(first.model), _state(again.model), _state(other.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    with torch.no_grad():
        logits = first.model(first.example_inputs(2)[0])
    assert logits.shape == (2, first.spec.num_classes) and logits.std() > 0


def test_unknown_timm_model_and_bad_weights_are_eq_errors() -> None:
    with pytest.raises(EQError, match=r"unknown timm model 'vit_tiny_patch16_22'\. Did you mean timm:vit_tiny_patch16_224"):
        get_model("timm:vit_tiny_patch16_22")
    with pytest.raises(EQError, match="use 'none' \\(seeded init\\), 'DEFAULT'"):
        get_model("timm:test_vit", weights="IMAGENET1K_V1")


def test_hf_bert_tiny_takes_token_ids_and_returns_logits() -> None:
    zoo = get_model("hf:bert-tiny")
    assert isinstance(zoo.model, TextLogits)
    config = zoo.model.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 128, 2)
    spec = zoo.spec
    assert isinstance(spec, TokenSpec) and spec.default_data == "tokens"
    assert (spec.seq_len, spec.vocab_size, spec.pad_id, spec.first_id) == (32, 30522, 0, 101)
    ids = token_ids(spec, 4, seed=0)
    with torch.no_grad():
        logits = zoo.model(ids)
        full = zoo.model.model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert logits.shape == (4, 2) and torch.equal(logits, full)
    # padding is masked out: extra padding does not change the logits
    padded = torch.cat([ids, torch.zeros(4, 8, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(zoo.model(padded), logits, rtol=1e-4, atol=1e-5)


def test_hf_user_config_json_and_its_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL_BERT))
    for source in (tmp_path / "config.json", tmp_path):
        zoo = get_model(f"hf:{source}")
        assert isinstance(zoo.model, TextLogits) and zoo.spec.vocab_size == 100
        assert zoo.spec.labels == ("LABEL_0", "LABEL_1", "LABEL_2")
        with torch.no_grad():
            assert zoo.model(zoo.example_inputs(2)[0]).shape == (2, 3)


def test_hf_vit_tiny_is_an_image_model() -> None:
    zoo = get_model("hf:vit-tiny")
    assert isinstance(zoo.model, ImageLogits) and zoo.spec.shape == (3, 224, 224)
    assert zoo.spec.num_classes == 1000


def test_bad_hf_configs_are_eq_errors(tmp_path: Path) -> None:
    with pytest.raises(EQError, match="hf config 'nope.json' is neither a built-in config \\(bert-tiny, vit-tiny\\)"):
        get_model("hf:nope.json")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(EQError, match="is not a transformers config .* known \"model_type\""):
        get_model(f"hf:{bad}")
    with pytest.raises(EQError, match="use 'none' \\(seeded init\\), 'DEFAULT'"):
        get_model("hf:bert-tiny", weights="IMAGENET1K_V1")


def test_tokens_data_vary_in_length_pad_and_repeat() -> None:
    spec = TokenSpec(seq_len=16, vocab_size=50, labels=("a", "b"), pad_id=0, first_id=7, low_id=10)
    ids = token_ids(spec, 64, seed=3)
    assert torch.equal(ids, token_ids(spec, 64, seed=3)) and not torch.equal(ids, token_ids(spec, 64, seed=4))
    lengths = (ids != 0).sum(1)
    assert lengths.min() >= 4 and lengths.max() == 16 and len(set(lengths.tolist())) > 5
    assert (ids[:, 0] == 7).all()
    for row, length in zip(ids, lengths):  # words then padding, never a pad inside
        assert (row[1:length] >= 10).all() and (row[length:] == 0).all()
    calib = next(iter(tokens_loader(spec, split="calib", batch_size=8, count=8)))
    evaluation = next(iter(tokens_loader(spec, split="eval", batch_size=8)))
    assert calib[0].shape == evaluation[0].shape == (8, 16) and not torch.equal(calib[0], evaluation[0])
    assert (calib[1] == -1).all()
    assert (spec.example_inputs(3)[0] != 0).all()


def test_loaders_refuse_data_of_the_other_kind() -> None:
    text = TokenSpec(seq_len=8, vocab_size=20, labels=("a", "b"))
    loaders = get_loaders("tokens", text, batch_size=4, calib_batches=2)
    assert (loaders.name, loaders.num_calib, loaders.num_eval, loaders.has_labels) == ("tokens", 8, 32, False)
    with pytest.raises(EQError, match="takes token ids, not images \\('samples'\\); use --eq-data tokens"):
        get_loaders("samples", text, model_name="m")
    image = get_model("digits").spec
    with pytest.raises(EQError, match="the tokens data are token ids for text models"):
        get_loaders("tokens", image)


def test_tensor_loaders_take_inputs_or_pairs() -> None:
    ids = torch.randint(1, 20, (10, 8))
    loaders = tensor_loaders("mine", ids[:6], (ids[6:], torch.tensor([0, 1, -1, 1])), batch_size=4)
    assert (loaders.num_calib, loaders.num_eval, loaders.has_labels) == (6, 4, True)
    assert torch.equal(next(iter(loaders.calib))[0], ids[:4])
    with pytest.raises(EQError, match="data 'mine': the evaluation part must be a non-empty tensor"):
        tensor_loaders("mine", ids, (ids, torch.zeros(3)))


def test_seeded_bert_tiny_logits_vary_with_the_sentence() -> None:
    """Seeded at transformers' 0.02 std the [CLS] logits varied by 4e-4 across the tokens data at
    0.03: quantization tests on it compared a constant. Its linear layers now keep their input's scale."""
    zoo, again = get_model("hf:bert-tiny", seed=0), get_model("hf:bert-tiny", seed=0)
    data = get_loaders("tokens", zoo.spec, batch_size=8, calib_batches=1)
    ids = torch.cat([batch[0] for batch in data.eval])
    with torch.no_grad():
        logits, repeat = zoo.model(ids).double(), again.model(ids).double()
    assert torch.equal(logits, repeat)  # deterministic under the seed
    assert logits.shape == (32, 2)
    across = logits.std(0)  # per output, over the 32 sentences
    assert across.min() > 0.05 and across.min() > 0.1 * logits.abs().max()
    centered = logits - logits.mean(0)
    assert centered.pow(2).mean().sqrt() > 0.2 * logits.pow(2).mean().sqrt()


@pytest.mark.slow
def test_bert_tiny_goes_through_pt2e_with_readable_names() -> None:
    from eqcore.analysis.sa_run import run_sensitivity_analysis
    from eqcore.prepare.calibrate import calibrate
    from eqcore.prepare.quantize import prepare

    zoo = get_model("hf:bert-tiny")
    prepared = prepare(zoo.model, "w8a8", zoo.example_inputs())
    assert prepared.backend == "pt2e" and "does not trace with torch.fx" in prepared.backend_note
    names = set(prepared.quantizers)
    layer = "model.bert.encoder.layer.0"
    assert {f"{layer}.attention.self.query.weight_fake_quant", f"{layer}.attention.self.query.output_quant",
            f"{layer}.attention.self.scaled_dot_product_attention_quant", "model.classifier.weight_fake_quant"} <= names
    loaders = get_loaders("tokens", zoo.spec, batch_size=8, calib_batches=1)
    calibrate(prepared.model, loaders.calib)
    sa = run_sensitivity_analysis(prepared.model, loaders.eval, bit_res=None)
    assert f"{layer}.attention.self.query" in sa.weights and not sa.errors


@pytest.mark.parametrize("name", ["hf:bert-tiny", "timm:test_vit"])
def test_pretrained_weights_without_internet_fail_at_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No internet here or in CI; the name lookup is made to fail so the test does not depend on it."""
    import socket

    def offline(*_: object, **__: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-eq-cache")
    with pytest.raises(EQError, match=f"{name} with --eq-weights DEFAULT needs the Hugging Face hub, and "
                                      "huggingface.co cannot be reached .*use --eq-weights none"):
        get_model(name, weights="DEFAULT")
