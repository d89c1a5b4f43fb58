"""EMA weights: the average against a float64 recurrence written out here, the warm-up formula, the swap for eval,
what a skipped (non-finite) step does, and the merge used by export (locked parameters and buffers kept)."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import RootConfig
from clipkit.ema import EMA, with_ema
from clipkit.engine.parts import TorchUpdate
from clipkit.errors import ConfigError
from clipkit.model import apply_locks, build
from clipkit.model_config import ModelConfig


def _reference(history: list[dict[str, torch.Tensor]], decay: float, warmup: bool) -> dict[str, torch.Tensor]:
    """e_0 = w_0; e_n = d_n * e_{n-1} + (1 - d_n) * w_n with d_n = min(decay, 1 - (1 + n)^(-2/3)), in float64."""
    avg = {k: v.double().clone() for k, v in history[0].items()}
    for n, weights in enumerate(history[1:], start=1):
        d = min(decay, 1 - (1 + n) ** (-2 / 3)) if warmup else decay
        avg = {k: d * avg[k] + (1 - d) * weights[k].double() for k in avg}
    return avg


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_recurrence(warmup):
    torch.manual_seed(0)
    params = {"a": torch.randn(5, 3), "b": torch.randn(7)}
    ema = EMA(lambda: params, decay=0.9, warmup=warmup)
    history = [{k: v.clone() for k, v in params.items()}]
    for _ in range(30):
        for v in params.values():
            v.add_(torch.randn_like(v))
        ema.update()
        history.append({k: v.clone() for k, v in params.items()})
    ref = _reference(history, 0.9, warmup)
    assert ema.updates == 30
    for k in params:
        torch.testing.assert_close(ema.shadow[k].double(), ref[k], atol=1e-5, rtol=0)


def test_warmup_ramps_the_decay_to_its_ceiling():
    ema = EMA(dict, decay=0.999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))  # 0.37: the start is not held back by the init
    assert ema.decay_at(100) == pytest.approx(1 - 101 ** (-2 / 3))
    assert ema.decay_at(10**6) == 0.999
    assert EMA(dict, decay=0.999, warmup=False).decay_at(1) == 0.999


def test_swapped_holds_the_average_then_restores_the_parameters_exactly():
    params = {"w": torch.randn(4, 4)}
    ema = EMA(lambda: params, decay=0.5, warmup=False)
    raw = params["w"].clone()
    ema.shadow["w"].fill_(3.0)
    with ema.swapped():
        assert torch.equal(params["w"], torch.full((4, 4), 3.0))
    assert torch.equal(params["w"], raw)


def _update(model, ema_decay: float) -> TorchUpdate:
    cfg = RootConfig()
    cfg.train.ema_decay = ema_decay
    cfg.optim.warmup_steps = 0
    from clipkit import ema as ema_lib

    ema = ema_lib.build(cfg, lambda: {n: p.detach() for n, p in ema_lib.trainable(model).items()})
    return TorchUpdate(model, cfg, torch.device("cpu"), None, ema)


def test_a_skipped_nonfinite_step_moves_neither_the_weights_nor_the_average():
    torch.manual_seed(0)
    model = build(ModelConfig()).model
    update = _update(model, 0.9)
    images, text = torch.rand(4, 3, 32, 32), torch.randint(0, 1000, (4, 16))

    def loss_step(scale: float):
        out = model(images, text)
        (scale * (out["image_features"] @ out["text_features"].T).sum()).backward()
        return update.step()

    _, applied = loss_step(1.0)
    assert applied and update.ema.updates == 1
    before = {k: v.clone() for k, v in update.ema.shadow.items()}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _, applied = loss_step(float("nan"))
    assert not applied and update.ema.updates == 1
    assert all(torch.equal(before[k], update.ema.shadow[k]) for k in before)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    _, applied = loss_step(1.0)  # the next applied step moves it again, as the 2nd update
    assert (
        applied
        and update.ema.updates == 2
        and not torch.equal(before["text_projection"], update.ema.shadow["text_projection"])
    )


def test_only_trainable_parameters_are_averaged_and_export_keeps_the_rest():
    cfg = ModelConfig(lock_image=True)
    model = build(cfg).model
    apply_locks(model, cfg)
    update = _update(model, 0.9)
    assert update.ema.shadow and not any(k.startswith("visual.") for k in update.ema.shadow)
    state = model.state_dict()
    averaged = {k: torch.zeros_like(v) for k, v in update.ema.shadow.items()}
    merged = with_ema(state, averaged)
    assert merged.keys() == state.keys()
    for k, v in merged.items():
        assert torch.equal(v, averaged[k] if k in averaged else state[k]), k
    with pytest.raises(KeyError, match="not in the model"):
        with_ema(state, {"nope": torch.zeros(1)})


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_ema_decay_out_of_range_is_a_named_config_error(value):
    cfg = RootConfig()
    cfg.train.ema_decay = value
    with pytest.raises(ConfigError, match="train.ema_decay"):
        cfg.train.validate()
