"""Residual streams of any shape: an MLP's (batch, d) and a conv ResNet's (batch, C, H, W) states,
observed through the graph, against a direct numpy computation of the statistics' definitions."""

import numpy as np
import pytest
import torch
from calibration_run import PLAIN_FIELDS, Calibrated, loader, plain_data, trainer
from test_callback_conventions import MLP
from tolerances import angular_tolerance, assert_within, cosine_error

import lorp_fx
from lorp_fx.calibration.graph_observer import collect_statistics
from lorp_fx.core.stats import token_vectors


class ConvBlock(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(channels)

    def forward(self, x):
        return x + torch.relu(self.norm(self.conv(x)))


class ResNet(torch.nn.Module):
    def __init__(self, channels=6, depth=4, classes=3):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.layers = torch.nn.ModuleList(ConvBlock(channels) for _ in range(depth))
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean((2, 3)))


def residual_states(network, x) -> list[np.ndarray]:
    """The stream entering each block, then leaving the last: written out, no hooks, no graph."""
    h = network.stem(x) if hasattr(network, "stem") else x
    states = [h]
    for block in getattr(network, "blocks", None) or network.layers:
        h = h + block(h) if isinstance(network, MLP) else block(h)
        states.append(h)
    return [s.double().numpy() for s in states]


def direct(batches: list[list[np.ndarray]], channel_axis: int):
    """S, angular and last-token angular from the definitions, and the cosines of every token and last token
    they average: a token is the feature vector at one position (channels at one pixel for images); each
    example's last token is its last position."""
    tokens, lasts = [], []
    for states in batches:
        per_point = [np.moveaxis(s, channel_axis, -1) for s in states]
        per_point = [s.reshape(s.shape[0], -1, s.shape[-1]) for s in per_point]  # (B, positions, C)
        tokens.append(np.stack([s.reshape(-1, s.shape[-1]) for s in per_point], axis=1))  # (n, P, C)
        lasts.append(np.stack([s[:, -1] for s in per_point], axis=1))  # (B, P, C)

    def cosines(vectors):  # (tokens, P, P)
        unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
        return np.clip(np.einsum("npc,nqc->npq", unit, unit), -1, 1)

    cos, last_cos = cosines(np.concatenate(tokens)), cosines(np.concatenate(lasts))
    return cos.mean(0), (np.arccos(cos) / np.pi).mean(0), (np.arccos(last_cos) / np.pi).mean(0), cos, last_cos


@pytest.mark.numeric
@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_statistics_of_mlp_and_conv_resnet_streams_match_numpy(kind):
    """In float64 end to end, so the graph and the written-out network compute the same states; what remains
    is the accumulator's float32 cosines (tests/tolerances.py), which arccos magnifies where a ReLU branch
    adds nothing at a pixel (cosine 1: that bound is sqrt(2 e), not e)."""
    torch.manual_seed(0)
    network = (MLP() if kind == "mlp" else ResNet()).double().eval()
    shape = (16,) if kind == "mlp" else (3, 5, 4)
    batches = [torch.randn(3, *shape, dtype=torch.float64) for _ in range(3)]
    stats, graph = collect_statistics(network, batches, progress=False)
    with torch.no_grad():
        s, angle, last, cos, last_cos = direct([residual_states(network, x) for x in batches],
                                               channel_axis=1 if kind == "resnet" else -1)
    assert stats.similarity.shape == (5, 5) and len(stats.blocks) == 4
    features = 16 if kind == "mlp" else 6
    float32 = cosine_error(features, "float32") + 2 * cosine_error(features, "float64")  # tokens: float32 cosines
    float64 = 3 * cosine_error(features, "float64")  # last tokens: float64 throughout
    assert_within(stats.similarity, s, float32, "similarity")
    assert_within(stats.angular, angle, angular_tolerance(cos, float32), "angular")
    assert_within(stats.last_token_angular, last, angular_tolerance(last_cos, float64), "last_token_angular")
    positions = 1 if kind == "mlp" else 5 * 4
    assert stats.token_count == 9 * positions and stats.sequence_count == 9
    assert len(lorp_fx.find_blocks(lorp_fx.prune(graph, [stats.blocks[1]]))) == 3


def test_a_conv_resnet_calibrates_and_prunes_through_the_callback():
    torch.manual_seed(0)
    network = ResNet().eval()
    data = plain_data(shape=(3, 5, 4))
    cb = lorp_fx.LoRPCallback(n_remove=1, method="shortgpt", apply=True)
    module = Calibrated(network, call="x", fields=PLAIN_FIELDS)
    trainer(cb).validate(module, dataloaders=loader(data, form="tuple"))
    assert cb.plan.statistics.token_count == 8 * 20
    assert len(lorp_fx.find_blocks(module.model)) == 3
    x = torch.stack([d["x"] for d in data[:2]])
    removed = int(cb.plan.remove[0].split(".")[1])
    with torch.no_grad():
        h = network.stem(x)
        for i, layer in enumerate(network.layers):
            h = h if i == removed else layer(h)
        torch.testing.assert_close(module.model(x), network.head(h.mean((2, 3))))


@pytest.mark.parametrize(
    "shape, channels_first, expected",
    [((4, 8), False, (4, 1, 8)), ((4, 7, 8), False, (4, 7, 8)), ((4, 8, 5, 3), True, (4, 15, 8)),
     ((4, 5, 3, 8), False, (4, 15, 8)), ((8,), False, (1, 1, 8))],
)
def test_token_vectors_put_the_features_last(shape, channels_first, expected):
    state = torch.randn(*shape)
    tokens = token_vectors(state, channels_first)
    assert tuple(tokens.shape) == expected
    if channels_first:  # the token at (b, pixel) is the channel vector there
        torch.testing.assert_close(tokens[1, 2 * 3 + 1], state[1, :, 2, 1])
