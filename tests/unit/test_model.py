"""Tests of the RADnet model: shapes per variant, geometry, parameter count, state_dict keys."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from radnet_node.model import (
    AUX_SCALES,
    VARIANTS,
    RADnet,
    RadnetConfig,
    RadnetOutput,
    build_model,
    count_parameters,
    measure_flops_per_slice,
)

torch.set_num_threads(1)

TINY = {"layers_per_block": 2, "growth_rate": 4, "stem_channels": 8, "lstm_hidden": 8}


def tiny(variant: str = "radnet", **overrides: object) -> RADnet:
    """A small, deterministic model in eval mode (dropout off, batch norm with fixed statistics)."""
    torch.manual_seed(0)
    return build_model(variant, **{**TINY, **overrides}).eval()  # type: ignore[arg-type]


def analytic_parameter_count(config: RadnetConfig) -> int:
    """Trainable parameters of the architecture, counted by hand from its description."""
    k, n = config.growth_rate, config.layers_per_block
    total = 9 * config.stem_channels  # stem: 3x3 conv, 1 -> stem_channels, no bias
    channels = config.stem_channels
    block_outputs = []
    for block in range(3):
        for _ in range(n):
            total += 2 * channels + 9 * channels * k  # BN (gamma, beta) + 3x3 conv, no bias
            channels += k
        block_outputs.append(channels)
        if block < 2:
            total += 2 * channels + channels * channels  # transition BN + 1x1 conv
    total += 2 * channels  # norm_final
    if config.has_aux:
        for c, scale in zip(block_outputs, AUX_SCALES, strict=True):
            total += 2 * c + c + (2 * scale) ** 2 + 1  # BN, 1x1 conv, deconv weight + bias
    if config.has_lstm:
        h = config.lstm_hidden
        total += 2 * (4 * h * channels + 4 * h * h + 2 * 4 * h)  # both directions, 2 biases each
        total += 2 * h + 1
    else:
        total += channels + 1
    return total


def analytic_inference_flops(config: RadnetConfig, size: int) -> int:
    """Convolution and linear-layer FLOPs of one eval-mode slice (multiply-add = 2).

    FlopCounterMode does not count the CPU LSTM kernel (about 1.2 MFLOP per slice at the default
    size, under 0.02 %), so neither does this.
    """
    k, n = config.growth_rate, config.layers_per_block
    sides = [(size + 1) // 2]
    sides += [sides[0] // 2, sides[0] // 4]
    macs = sides[0] ** 2 * 9 * config.stem_channels
    channels = config.stem_channels
    outputs = []
    for block, side in enumerate(sides):
        for _ in range(n):
            macs += side**2 * 9 * channels * k
            channels += k
        outputs.append(channels)
        if block < 2:
            macs += (side // 2) ** 2 * channels * channels  # pooled before the 1x1 conv
    if config.has_aux:
        for c, side, scale in zip(outputs, sides, AUX_SCALES, strict=True):
            macs += side**2 * c + side**2 * (2 * scale) ** 2
    macs += 2 * config.lstm_hidden if config.has_lstm else channels  # classifier
    return 2 * macs


# --- configuration ---------------------------------------------------------------------------


def test_config_round_trips_through_dict() -> None:
    config = RadnetConfig(variant="densenet_a", dropout=0.1, input_size=64)
    assert RadnetConfig.from_dict(config.to_dict()) == config
    assert RadnetConfig.from_dict({}) == RadnetConfig()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"variant": "resnet"}, "variant"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"layers_per_block": 2.5}, "layers_per_block"),
        ({"dropout": 1.0}, "dropout"),
        ({"input_size": 6}, "input_size"),
        ({"lstm_hiden": 64}, "lstm_hiden"),
    ],
)
def test_config_from_dict_names_the_bad_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}:"):
        RadnetConfig.from_dict(data)


@pytest.mark.parametrize(
    ("variant", "has_aux", "has_lstm"),
    [("densenet", False, False), ("densenet_a", True, False), ("radnet", True, True)],
)
def test_variant_flags_and_submodules(variant: str, has_aux: bool, has_lstm: bool) -> None:
    model = tiny(variant)
    assert (model.config.has_aux, model.config.has_lstm) == (has_aux, has_lstm)
    names = {name for name, _ in model.named_children()}
    assert {"stem", "block1", "transition1", "block2", "transition2", "block3"} <= names
    assert {"norm_final", "classifier"} <= names
    assert {"aux1", "aux2", "aux3"} <= names if has_aux else not names & {"aux1", "aux2", "aux3"}
    assert ("lstm" in names) == has_lstm


# --- shapes and geometry ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("batch", "slices", "size"), [(1, 1, 32), (2, 3, 32), (1, 4, 33)])
def test_output_shapes(variant: str, batch: int, slices: int, size: int) -> None:
    model = tiny(variant)
    with torch.no_grad():
        output = model(torch.rand(batch, slices, size, size))
    assert isinstance(output, RadnetOutput)
    assert output.slice_logits.shape == (batch, slices)
    assert output.slice_logits.dtype == torch.float32
    if variant == "densenet":
        assert output.aux_logits is None
    else:
        assert output.aux_logits is not None
        assert [tuple(a.shape) for a in output.aux_logits] == [(batch, slices, size, size)] * 3


@pytest.mark.parametrize(
    ("height", "width"), [(250, 250), (251, 251), (33, 31), (7, 9), (64, 100), (255, 249)]
)
def test_aux_heads_restore_exact_input_size(height: int, width: int) -> None:
    model = tiny("densenet_a", layers_per_block=1, growth_rate=2, stem_channels=4)
    with torch.no_grad():
        features, aux = model.encode_slices(torch.rand(2, 1, height, width))
    assert features.shape == (2, model.config.feature_channels)
    assert aux is not None
    assert [tuple(a.shape) for a in aux] == [(2, 1, height, width)] * 3


def test_aux_heads_can_be_skipped_and_densenet_has_none() -> None:
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert tiny("radnet").encode_slices(x, with_aux=False)[1] is None
        assert tiny("densenet").encode_slices(x, with_aux=True)[1] is None


def test_blocks_run_at_half_quarter_and_eighth_of_the_input() -> None:
    model = tiny("radnet")
    sides: dict[str, int] = {}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda module, args, out, name=name: sides.__setitem__(name, out.shape[-1])
        )
        for name in ("block1", "block2", "block3")
    ]
    with torch.no_grad():
        model(torch.rand(1, 1, 250, 250))
    for hook in hooks:
        hook.remove()
    assert sides == {"block1": 125, "block2": 62, "block3": 31}


@pytest.mark.parametrize(
    ("shape", "message"),
    [((1, 1, 6, 32), "too small"), ((3, 32, 32), "shape"), ((0, 2, 32, 32), "shape")],
)
def test_forward_rejects_bad_input_with_the_shape(shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny("radnet")(torch.rand(*shape))


def test_forward_rejects_integer_pixels() -> None:
    with pytest.raises(ValueError, match="torch.int64"):
        tiny("radnet")(torch.zeros(1, 1, 32, 32, dtype=torch.int64))


def test_classify_sequence_rejects_wrong_feature_width() -> None:
    model = tiny("radnet")
    with pytest.raises(ValueError, match=rf"\(B, S, {model.config.feature_channels}\)"):
        model.classify_sequence(torch.rand(1, 3, model.config.feature_channels + 1))


# --- the full default model ------------------------------------------------------------------


def test_default_radnet_runs_on_one_250_slice_with_the_analytic_parameter_count() -> None:
    torch.manual_seed(0)
    model = build_model().eval()
    assert model.config.block_channels == (160, 304, 448)
    assert count_parameters(model) == analytic_parameter_count(model.config) == 1_610_148
    with torch.no_grad():
        output = model(torch.rand(1, 1, 250, 250))
    assert output.slice_logits.shape == (1, 1)
    assert torch.isfinite(output.slice_logits).all()
    assert output.aux_logits is not None
    assert all(a.shape == (1, 1, 250, 250) for a in output.aux_logits)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count_matches_the_architecture(variant: str) -> None:
    model = build_model(variant)  # type: ignore[arg-type]
    assert count_parameters(model) == analytic_parameter_count(model.config)


@pytest.mark.parametrize("variant", VARIANTS)
def test_measured_flops_match_the_architecture(variant: str) -> None:
    model = tiny(variant).train()
    measured = measure_flops_per_slice(model, input_size=33)
    assert measured == analytic_inference_flops(model.config, 33)
    assert model.training  # restored


def test_init_is_he_normal_for_convs_and_unit_batch_norm() -> None:
    torch.manual_seed(0)
    model = build_model("radnet")
    conv = model.transition2.conv.weight  # 304 x 304: enough samples for a tight estimate
    assert float(conv.detach().std()) == pytest.approx((2 / 304) ** 0.5, rel=0.02)
    norm = model.block2.layer3.norm
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
    assert torch.all(model.classifier.bias == 0)
    assert torch.all(model.aux1.upsample.bias == 0)


# --- state_dict ------------------------------------------------------------------------------

# sha256 of the sorted "key:shape" lines of the default config; update only on purpose, together
# with the model card version, because saved weights stop loading when this changes.
STATE_DICT_DIGESTS = {
    "densenet": (236, "8da22f8b20590886"),
    "densenet_a": (260, "faa868cc9ded90fc"),
    "radnet": (268, "ede9b28f20d9107a"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_and_shapes_are_stable(variant: str) -> None:
    state = build_model(variant).state_dict()  # type: ignore[arg-type]
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    digest = hashlib.sha256(lines.encode()).hexdigest()[:16]
    assert (len(state), digest) == STATE_DICT_DIGESTS[variant]


def test_state_dict_has_the_documented_key_names() -> None:
    state = build_model("radnet").state_dict()
    expected = {
        "stem.weight": (16, 1, 3, 3),
        "block1.layer1.norm.weight": (16,),
        "block1.layer1.conv.weight": (12, 16, 3, 3),
        "block3.layer12.conv.weight": (12, 436, 3, 3),
        "transition1.conv.weight": (160, 160, 1, 1),
        "transition2.norm.running_var": (304,),
        "norm_final.weight": (448,),
        "aux1.conv.weight": (1, 160, 1, 1),
        "aux2.upsample.weight": (1, 1, 8, 8),
        "aux3.upsample.weight": (1, 1, 16, 16),
        "lstm.weight_ih_l0": (512, 448),
        "lstm.weight_hh_l0_reverse": (512, 128),
        "classifier.weight": (1, 256),
    }
    assert {key: tuple(state[key].shape) for key in expected} == expected


def test_strict_state_dict_round_trip_reproduces_outputs() -> None:
    source = tiny("radnet")
    source.train()
    with torch.no_grad():  # move the batch-norm statistics away from their initial values
        source(torch.rand(1, 3, 32, 32))
    source.eval()
    target = RADnet(RadnetConfig.from_dict(source.config.to_dict()))
    target.load_state_dict(source.state_dict(), strict=True)
    target.eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x).slice_logits, target(x).slice_logits)


def test_loading_weights_of_another_variant_fails_strictly() -> None:
    with pytest.raises(RuntimeError, match="lstm"):
        tiny("densenet").load_state_dict(tiny("radnet").state_dict(), strict=True)


# --- sequence behaviour and the engine's split -----------------------------------------------


@pytest.mark.parametrize(
    ("variant", "context"), [("radnet", True), ("densenet", False), ("densenet_a", False)]
)
def test_lstm_gives_slices_context_of_their_neighbours(variant: str, context: bool) -> None:
    model = tiny(variant)
    x = torch.rand(1, 5, 32, 32)
    changed = x.clone()
    changed[0, 2] = torch.rand(32, 32)
    with torch.no_grad():
        before = model(x).slice_logits
        after = model(changed).slice_logits
    others = [0, 1, 3, 4]
    assert not torch.allclose(before[0, 2], after[0, 2])
    if context:
        assert (before[0, others] - after[0, others]).abs().min() > 0
    else:
        assert torch.equal(before[0, others], after[0, others])


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_then_classify_equals_forward(variant: str) -> None:
    model = tiny(variant)
    x = torch.rand(2, 4, 32, 32)
    with torch.no_grad():
        output = model(x)
        # The engine encodes a series in chunks and classifies the whole sequence at once.
        chunks = [
            model.encode_slices(x[b, i : i + 3].unsqueeze(1)) for b in range(2) for i in (0, 3)
        ]
        features = torch.cat([f for f, _ in chunks]).reshape(2, 4, -1)
        logits = model.classify_sequence(features)
    torch.testing.assert_close(logits, output.slice_logits)
    if output.aux_logits is not None:
        first_aux = torch.cat([aux[0] for _, aux in chunks if aux is not None]).reshape(
            2, 4, 32, 32
        )
        torch.testing.assert_close(first_aux, output.aux_logits[0])


def test_inference_buffer_path_equals_concatenation_path() -> None:
    model = tiny("radnet", layers_per_block=3)
    x = torch.rand(1, 1, 32, 32)
    with torch.inference_mode():
        buffered = model.encode_slices(x)
    with torch.enable_grad():
        concatenated = model.encode_slices(x)
    torch.testing.assert_close(buffered[0], concatenated[0].detach())
    for a, b in zip(buffered[1] or (), concatenated[1] or (), strict=True):
        torch.testing.assert_close(a, b.detach())


def test_eval_transition_pools_before_conv_with_the_same_result() -> None:
    model = tiny("radnet")
    transition = model.transition1
    x = torch.rand(2, transition.conv.in_channels, 17, 16)
    with torch.no_grad():
        reference = F.avg_pool2d(transition.conv(F.relu(transition.norm(x))), 2)
        torch.testing.assert_close(transition(x), reference)


def test_training_step_reaches_every_parameter() -> None:
    model = tiny("radnet", dropout=0.2).train()
    output = model(torch.rand(1, 3, 32, 32))
    assert output.aux_logits is not None
    loss = F.binary_cross_entropy_with_logits(output.slice_logits, torch.tensor([[0.0, 1.0, 1.0]]))
    for aux in output.aux_logits:
        loss = loss + F.binary_cross_entropy_with_logits(aux, torch.zeros_like(aux))
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_dropout_is_active_only_in_training() -> None:
    model = tiny("densenet", dropout=0.5)
    x = torch.rand(1, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x).slice_logits, model(x).slice_logits)
        model.train()
        torch.manual_seed(1)
        first = model(x).slice_logits
        torch.manual_seed(2)
        assert not torch.equal(first, model(x).slice_logits)


# --- memory formats, precision, export -------------------------------------------------------


def test_channels_last_matches_nchw() -> None:
    model = tiny("radnet")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model.to(memory_format=torch.channels_last)
        output = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(output.slice_logits, reference.slice_logits, atol=1e-5, rtol=1e-5)
    assert output.aux_logits is not None and reference.aux_logits is not None
    torch.testing.assert_close(output.aux_logits[2], reference.aux_logits[2], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 support"
)
def test_bf16_autocast_runs_and_returns_float32_close_to_fp32() -> None:
    model = tiny("radnet").to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = torch.sigmoid(model(x).slice_logits)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
    assert output.slice_logits.dtype == torch.float32
    assert output.aux_logits is not None and output.aux_logits[0].dtype == torch.float32
    assert (torch.sigmoid(output.slice_logits) - reference).abs().max() < 2e-2


def test_torch_export_round_trip() -> None:
    # TorchScript cannot compile the dataclass output; torch.export can once it is registered.
    if RadnetOutput not in torch.utils._pytree.SUPPORTED_NODES:
        torch.export.register_dataclass(RadnetOutput)
    model = tiny("radnet")
    x = torch.rand(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="_flat_weights"):  # torch's LSTM, harmless
        program = torch.export.export(model, (x,))
    exported = program.module()(x)
    with torch.no_grad():
        reference = model(x)
    torch.testing.assert_close(exported.slice_logits, reference.slice_logits)
