"""RADnet (DenseNet-40, auxiliary segmentation heads, bidirectional LSTM) and its ablation variants.

The network follows section 2.2.2 and Fig. 1 of the RADnet paper; ``densenet`` and ``densenet_a``
are the paper's ablation baselines (Table 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "VARIANTS",
    "AUX_SCALES",
    "RADnet",
    "RadnetConfig",
    "RadnetOutput",
    "Variant",
    "build_model",
    "count_parameters",
    "measure_flops_per_slice",
]

Variant = Literal["densenet", "densenet_a", "radnet"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)

#: Upsampling factor of each auxiliary head: the dense blocks run at 1/2, 1/4 and 1/8 of the input.
AUX_SCALES: tuple[int, int, int] = (2, 4, 8)

#: The smallest input side for which dense block 3 still has at least one pixel.
MIN_INPUT_SIZE = 7


@dataclass(frozen=True)
class RadnetConfig:
    """Hyper-parameters of RADnet; the defaults are the paper's DenseNet-40 at 250 x 250 px.

    Parameters
    ----------
    variant
        ``"densenet"`` (no auxiliary heads, no LSTM), ``"densenet_a"`` (auxiliary heads, no LSTM) or
        ``"radnet"`` (both), as in the paper's Table 1.
    growth_rate
        Channels added by each dense layer (k in DenseNet).
    layers_per_block
        Dense layers in each of the three dense blocks; 12 gives DenseNet-40 (3 * 12 + 4 = 40).
    stem_channels
        Output channels of the stride-2 stem convolution (16 in DenseNet-40).
    dropout
        Dropout rate after every convolution of the blocks and transitions, as in DenseNet.
    lstm_hidden
        Hidden units per direction of the bidirectional LSTM (``radnet`` only).
    input_size
        Side in pixels of the square slices the preprocessing produces (250 mm at 1 mm); the
        network is fully convolutional and accepts any side of at least 7 px, this value documents
        what it was trained for and is recorded in the model card.

    Raises
    ------
    ValueError
        If a value is out of range; the message names the field.
    """

    variant: Variant = "radnet"
    growth_rate: int = 12
    layers_per_block: int = 12
    stem_channels: int = 16
    dropout: float = 0.2
    lstm_hidden: int = 128
    input_size: int = 250

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: {self.variant!r} is not one of {', '.join(VARIANTS)}")
        for name in ("growth_rate", "layers_per_block", "stem_channels", "lstm_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        size = self.input_size
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_INPUT_SIZE:
            raise ValueError(f"input_size: must be an integer >= {MIN_INPUT_SIZE}, got {size!r}")
        rate = self.dropout
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout: must be a number in [0, 1), got {rate!r}")

    @property
    def has_aux(self) -> bool:
        """Whether the variant has the three auxiliary segmentation heads."""
        return self.variant in ("densenet_a", "radnet")

    @property
    def has_lstm(self) -> bool:
        """Whether the variant has the bidirectional LSTM across slices."""
        return self.variant == "radnet"

    @property
    def block_channels(self) -> tuple[int, int, int]:
        """Channels at the output of dense blocks 1, 2 and 3 (160, 304, 448 for DenseNet-40)."""
        grown = self.layers_per_block * self.growth_rate
        first = self.stem_channels + grown
        return (first, first + grown, first + 2 * grown)

    @property
    def feature_channels(self) -> int:
        """Length of the pooled feature vector of one slice (448 for DenseNet-40)."""
        return self.block_channels[2]

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as a JSON-serialisable dict (checkpoints, model cards)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RadnetConfig:
        """Build a configuration from a dict written by :meth:`to_dict`; missing keys default.

        Raises
        ------
        ValueError
            If ``d`` has a key that is not a field (the message names it) or a value out of range.
        """
        if not isinstance(d, dict):
            raise ValueError(f"model config: expected a dict, got {type(d).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: unknown model config key (known: {', '.join(sorted(known))})"
            )
        return cls(**d)


@dataclass(frozen=True)
class RadnetOutput:
    """What RADnet returns for a batch of slice sequences.

    Attributes
    ----------
    slice_logits
        Hemorrhage logit of every slice, shape (B, S).
    aux_logits
        Auxiliary segmentation logits at the input resolution, three tensors of shape (B, S, H, W)
        in the order block 1 (x2, finest), block 2 (x4), block 3 (x8); ``None`` for ``densenet``.
    """

    slice_logits: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...] | None


class _DenseLayer(nn.Module):
    """BN-ReLU-Conv3x3 to ``growth_rate`` new channels, then dropout (DenseNet, no bottleneck)."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(self.norm(x), inplace=True))
        return F.dropout(out, p=self.dropout, training=self.training)


class _DenseBlock(nn.Module):
    """A dense block: each layer sees the concatenation of the block input and all earlier outputs.

    For inference without autograd on one NCHW slice the layers write into one pre-allocated
    feature buffer and read a channel prefix of it (a contiguous view), which avoids
    re-concatenating a growing tensor at every layer (about 10 % faster, see
    benchmarks/bench_model.py). Otherwise the block concatenates: with autograd, because writing
    into a buffer that batch norm saved for backward is not allowed; in channels_last or with
    several slices, because a channel prefix of the buffer is then not contiguous and the
    convolution copies it (measured 8-40 % slower than concatenating).
    """

    def __init__(self, in_channels: int, num_layers: int, growth_rate: int, dropout: float) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.out_channels = in_channels + num_layers * growth_rate
        for index in range(num_layers):
            self.add_module(
                f"layer{index + 1}",
                _DenseLayer(in_channels + index * growth_rate, growth_rate, dropout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.shape[0] != 1 or not x.is_contiguous():
            features = x
            for layer in self.children():
                features = torch.cat([features, layer(features)], dim=1)
            return features
        buffer = x.new_empty((x.shape[0], self.out_channels, x.shape[2], x.shape[3]))
        filled = self.in_channels
        buffer[:, :filled].copy_(x)
        for layer in self.children():
            new = layer(buffer[:, :filled])
            buffer[:, filled : filled + self.growth_rate].copy_(new)
            filled += self.growth_rate
        return buffer


class _Transition(nn.Module):
    """BN-ReLU-Conv1x1 (no compression, as DenseNet-40), dropout, 2x2 average pooling."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm(x), inplace=True)
        if self.training and self.dropout > 0:
            out = F.dropout(self.conv(activated), p=self.dropout, training=True)
            return F.avg_pool2d(out, kernel_size=2, stride=2)
        # A 1x1 convolution and average pooling are both linear, so they commute; without dropout
        # between them, pooling first computes the same result with a quarter of the conv FLOPs.
        return self.conv(F.avg_pool2d(activated, kernel_size=2, stride=2))


class _AuxHead(nn.Module):
    """Auxiliary segmentation head: BN-ReLU-Conv1x1 to one channel, then a x``scale`` deconvolution.

    The deconvolution (kernel 2s, stride s, padding s/2) maps n pixels to n*s; ``output_size`` adds
    the rows a floor-halving lost (62 * 4 = 248 -> 250), and when a ceil-halving overshot (odd
    inputs: the stride-2 stem gives ceil(H/2) rows) the surplus last row is cropped, so the logits
    always have exactly the input size and stay aligned with its top-left corner.
    """

    def __init__(self, in_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.norm = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1, bias=False)
        self.upsample = nn.ConvTranspose2d(
            1, 1, kernel_size=2 * scale, stride=scale, padding=scale // 2, bias=True
        )

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        logits = self.conv(F.relu(self.norm(x), inplace=True))
        natural_h = x.shape[2] * self.scale
        natural_w = x.shape[3] * self.scale
        out = self.upsample(logits, output_size=[max(height, natural_h), max(width, natural_w)])
        return out[:, :, :height, :width]


class RADnet(nn.Module):
    """RADnet: DenseNet-40 slice encoder, three auxiliary segmentation heads, bidirectional LSTM.

    Geometry (Fig. 1 upsamples the auxiliary outputs x2, x4, x8, so the blocks run at 1/2, 1/4 and
    1/8 of the input): a 3x3 stride-2 stem convolution (16 channels) takes a 250 px slice to 125 px;
    dense block 1 (12 layers, growth 12, 16 -> 160 channels) runs at 125 px; a transition
    (BN-ReLU-Conv1x1, 2x2 average pool) takes it to 62 px for block 2 (160 -> 304 channels), another
    to 31 px for block 3 (304 -> 448 channels). Each block's last concatenation feeds an auxiliary
    head (BN-ReLU-Conv1x1 to one channel, deconvolution x2 / x4 / x8 back to exactly the input
    size). The main path is BN-ReLU, global average pooling to a 448-vector per slice, then
    (``radnet`` only) one bidirectional LSTM layer across the slices of the series, and a fully
    connected layer to one logit per slice.

    Parameters
    ----------
    config
        Hyper-parameters and the variant; see :class:`RadnetConfig`.

    Raises
    ------
    TypeError
        If ``config`` is not a :class:`RadnetConfig`.
    """

    def __init__(self, config: RadnetConfig = RadnetConfig()) -> None:  # noqa: B008 (frozen, immutable)
        super().__init__()
        if not isinstance(config, RadnetConfig):
            raise TypeError(f"config: expected RadnetConfig, got {type(config).__name__}")
        self.config = config
        c1, c2, c3 = config.block_channels
        n, k, p = config.layers_per_block, config.growth_rate, config.dropout

        self.stem = nn.Conv2d(
            1, config.stem_channels, kernel_size=3, stride=2, padding=1, bias=False
        )
        self.block1 = _DenseBlock(config.stem_channels, n, k, p)
        self.transition1 = _Transition(c1, p)
        self.block2 = _DenseBlock(c1, n, k, p)
        self.transition2 = _Transition(c2, p)
        self.block3 = _DenseBlock(c2, n, k, p)
        self.norm_final = nn.BatchNorm2d(c3)
        if config.has_aux:
            self.aux1 = _AuxHead(c1, AUX_SCALES[0])
            self.aux2 = _AuxHead(c2, AUX_SCALES[1])
            self.aux3 = _AuxHead(c3, AUX_SCALES[2])
        if config.has_lstm:
            self.lstm = nn.LSTM(
                c3, config.lstm_hidden, num_layers=1, batch_first=True, bidirectional=True
            )
            self.classifier = nn.Linear(2 * config.lstm_hidden, 1)
        else:
            self.classifier = nn.Linear(c3, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def encode_slices(
        self, x: torch.Tensor, *, with_aux: bool = True
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Encode independent slices: pooled DenseNet features and auxiliary segmentation logits.

        Parameters
        ----------
        x
            Slices of shape (N, 1, H, W), float in [0, 1]; any memory format.
        with_aux
            Compute the auxiliary heads (ignored, i.e. ``None``, for the ``densenet`` variant).

        Returns
        -------
        tuple
            Features of shape (N, C) with C = ``config.feature_channels``, and the three auxiliary
            logit maps of shape (N, 1, H, W) (block 1, 2, 3) or ``None``; float32 also under
            bf16/fp16 autocast.

        Raises
        ------
        ValueError
            If ``x`` is not (N, 1, H, W) floating point with H, W >= 7.
        """
        if x.dim() != 4 or x.shape[1] != 1 or not x.is_floating_point():
            raise ValueError(
                f"encode_slices: expected float slices of shape (N, 1, H, W), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        height, width = int(x.shape[2]), int(x.shape[3])
        _check_spatial_size(height, width)
        want_aux = with_aux and self.config.has_aux

        out1 = self.block1(self.stem(x))
        out2 = self.block2(self.transition1(out1))
        out3 = self.block3(self.transition2(out2))
        features = torch.flatten(
            F.adaptive_avg_pool2d(F.relu(self.norm_final(out3), inplace=True), 1), start_dim=1
        )
        aux: tuple[torch.Tensor, ...] | None = None
        if want_aux:
            aux = (
                _full_precision(self.aux1(out1, height, width)),
                _full_precision(self.aux2(out2, height, width)),
                _full_precision(self.aux3(out3, height, width)),
            )
        return _full_precision(features), aux

    def classify_sequence(self, features: torch.Tensor) -> torch.Tensor:
        """Slice logits from pooled features; the LSTM runs across the slices for ``radnet``.

        Parameters
        ----------
        features
            Shape (B, S, C): the features of S consecutive slices of one series, in order, per row.

        Returns
        -------
        torch.Tensor
            Slice logits of shape (B, S); float32 also under bf16/fp16 autocast.

        Raises
        ------
        ValueError
            If ``features`` is not (B, S, C) with C = ``config.feature_channels`` and S >= 1.
        """
        expected = self.config.feature_channels
        if features.dim() != 3 or features.shape[2] != expected or features.shape[1] < 1:
            raise ValueError(
                f"classify_sequence: expected features of shape (B, S, {expected}) with S >= 1, "
                f"got {tuple(features.shape)}"
            )
        if self.config.has_lstm:
            context, _ = self.lstm(features)
            return _full_precision(self.classifier(context).squeeze(-1))
        return _full_precision(self.classifier(features).squeeze(-1))

    def forward(self, x: torch.Tensor) -> RadnetOutput:
        """Run RADnet on batches of slice sequences.

        Parameters
        ----------
        x
            Shape (B, S, H, W), float in [0, 1]; S consecutive slices of one series, in order.

        Returns
        -------
        RadnetOutput
            Slice logits (B, S) and, for the variants with auxiliary heads, three (B, S, H, W) maps.

        Raises
        ------
        ValueError
            If ``x`` is not (B, S, H, W) floating point with B, S >= 1 and H, W >= 7.
        """
        if x.dim() != 4 or not x.is_floating_point() or x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(
                "forward: expected float slices of shape (B, S, H, W), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        batch, slices, height, width = (int(size) for size in x.shape)
        features, aux = self.encode_slices(x.reshape(batch * slices, 1, height, width))
        slice_logits = self.classify_sequence(features.reshape(batch, slices, -1))
        aux_logits = (
            None if aux is None else tuple(a.reshape(batch, slices, height, width) for a in aux)
        )
        return RadnetOutput(slice_logits=slice_logits, aux_logits=aux_logits)


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Return bf16/fp16 (autocast) results as float32: probabilities and losses keep precision."""
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return tensor.float()
    return tensor


def _check_spatial_size(height: int, width: int) -> None:
    """Raise ValueError if block 3 would have no pixel left (sides under 7 px)."""
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(
            f"slices of {height} x {width} px are too small: RADnet needs at least "
            f"{MIN_INPUT_SIZE} px per side (block 3 runs at 1/8 of the input)"
        )


def build_model(variant: Variant = "radnet", **overrides: Any) -> RADnet:
    """Build a RADnet variant with the paper's hyper-parameters, optionally overriding some.

    Parameters
    ----------
    variant
        ``"densenet"``, ``"densenet_a"`` or ``"radnet"``.
    **overrides
        Other :class:`RadnetConfig` fields, e.g. ``layers_per_block=2`` for a tiny test model.

    Returns
    -------
    RADnet
        A freshly initialised model in training mode.

    Raises
    ------
    ValueError
        If the variant or an override is unknown or out of range (the message names it).
    """
    return RADnet(RadnetConfig.from_dict({"variant": variant, **overrides}))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (batch-norm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_flops_per_slice(model: RADnet, input_size: int = 250) -> float:
    """FLOPs of one inference forward pass on one square slice, auxiliary heads included.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs; it
    counts convolutions, deconvolutions and matrix products, not the element-wise batch norm, ReLU
    and pooling, nor the CPU LSTM kernel: about 1.2 MFLOP per slice at the default size, under
    0.02 %). The model runs in eval mode without autograd, as the engine runs it (so the
    transitions pool before their 1x1 convolution); its training flag is restored afterwards.

    Raises
    ------
    ValueError
        If ``input_size`` is below 7 px.
    """
    _check_spatial_size(input_size, input_size)
    parameter = next(model.parameters())
    slice_ = torch.zeros(
        (1, 1, input_size, input_size), dtype=parameter.dtype, device=parameter.device
    )
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(slice_)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())
