import pytest
import torch
from helpers import PAD, batches, method, peft_model, train

from ilora import ILoRAError
from ilora.core.adapters import PLASTIC, STABLE, AdapterPair
from ilora.data.encode import pad_rows
from ilora.methods.ilora import consistency_loss, ema_coefficient


def test_ema_coefficient_warms_up_then_caps_at_ema_alpha():
    assert ema_coefficient(1, 0.999) == pytest.approx(0.5)
    assert ema_coefficient(3, 0.999) == pytest.approx(0.75)
    assert ema_coefficient(10_000, 0.999) == pytest.approx(0.999)
    assert ema_coefficient(5, 0.6) == pytest.approx(0.6)


@pytest.mark.parametrize("ema_alpha", [0.6, 0.95])
def test_stable_adapter_equals_closed_form_ema_of_plastic_trajectory(ema_alpha):
    ilora = method(ema_alpha=ema_alpha)
    initial = [t.detach().clone() for t in ilora.adapters.stable]
    trajectory = []
    train(ilora, batches(6), record=trajectory)

    expected = [t.double() for t in initial]
    for step, plastic in enumerate(trajectory, start=1):
        a = min(1 - 1 / (step + 1), ema_alpha)
        expected = [a * s + (1 - a) * p.double() for s, p in zip(expected, plastic)]
    for got, want in zip(ilora.adapters.stable, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    moved = max((s - i).abs().max().item() for s, i in zip(ilora.adapters.stable, initial))
    assert moved > 1e-4, "the stable adapter never moved"
    assert ilora.step == 6


def test_only_plastic_tensors_get_gradients_and_base_never_changes():
    ilora = method()
    model = ilora.model
    plastic_ids = {id(t) for t in ilora.adapters.plastic}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    data = batches(3)
    train(ilora, data[:2])  # fills the buffer so the next step has replay and consistency
    ilora.loss(data[2]).backward()
    for name, param in model.named_parameters():
        if id(param) in plastic_ids:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} received a gradient"
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"


def test_switching_adapters_leaves_requires_grad_alone_and_changes_the_output():
    ilora = method(model=peft_model(init_lora_weights=False))
    with torch.no_grad():
        for t in ilora.adapters.stable:
            t.mul_(2.0)  # make the adapters differ
    flags = [p.requires_grad for p in ilora.model.parameters()]
    ids = batches(1)[0]["input_ids"]
    with ilora.adapters.active(STABLE):
        stable_out = ilora.model(input_ids=ids).logits
    with ilora.adapters.active(PLASTIC):
        plastic_out = ilora.model(input_ids=ids).logits
    assert flags == [p.requires_grad for p in ilora.model.parameters()]
    assert not torch.allclose(stable_out, plastic_out)
    assert all(t.requires_grad for t in ilora.adapters.plastic)
    assert not any(t.requires_grad for t in ilora.adapters.stable)


def test_a_step_with_replay_runs_two_decoder_passes_and_the_stable_lm_head_on_one_position():
    ilora = method()
    data = batches(2)
    train(ilora, data[:1])
    decoder_calls, lm_head_positions = [], []
    base = ilora.model.get_base_model()
    hooks = [
        base.get_decoder().register_forward_hook(lambda *a: decoder_calls.append(1)),
        base.lm_head.register_forward_hook(lambda module, inputs, output: lm_head_positions.append(inputs[0].shape[1])),
    ]
    ilora.loss(data[1])
    for hook in hooks:
        hook.remove()
    assert len(decoder_calls) == 2
    longest = int(data[1]["attention_mask"].sum(dim=1).max())
    assert lm_head_positions[0] == 1 and lm_head_positions[1] >= longest  # stable pass first, then plastic


def _replay_only_method(layers, init_lora_weights=False):
    """A method whose buffer holds exactly one replay batch, and that replay batch."""
    ilora = method(model=peft_model(init_lora_weights=init_lora_weights), hidden_state_layers=layers)
    replay = batches(1, offset=100)[0]
    for i, n in enumerate(replay["lengths"]):
        ilora.buffer.add(replay["input_ids"][i, :n], replay["labels"][i, :n])
    ilora.buffer.capacity = len(ilora.buffer)  # later adds may replace rows but sampling happens first
    return ilora, replay


def _direct_consistency(ilora, replay, layer):
    """Consistency computed independently: full hidden_states of both adapters on the replay rows."""
    with torch.no_grad():
        outs = {}
        for name in (PLASTIC, STABLE):
            with ilora.adapters.active(name):
                outs[name] = ilora.model(
                    input_ids=replay["input_ids"], attention_mask=replay["attention_mask"], output_hidden_states=True
                ).hidden_states[layer]
    mask = replay["attention_mask"].bool()
    return ((outs[PLASTIC] - outs[STABLE])[mask] ** 2).mean().item()


@pytest.mark.parametrize("layer", [1, -1])
def test_consistency_uses_the_layers_asked_for(layer):
    ilora, replay = _replay_only_method([layer])
    with torch.no_grad():
        for t in ilora.adapters.stable:
            t.mul_(0.5)
    ilora.loss(batches(1)[0])
    logged = ilora.pop_logs()["consistency_loss"]
    assert logged == pytest.approx(_direct_consistency(ilora, replay, layer), rel=1e-4)
    other = 0 if layer == -1 else -1
    assert logged != pytest.approx(_direct_consistency(ilora, replay, other), rel=1e-2)


def test_consistency_is_zero_when_both_adapters_are_equal():
    ilora, _ = _replay_only_method([-1, 1])
    ilora.loss(batches(1)[0])
    assert ilora.pop_logs()["consistency_loss"] < 1e-10


def test_consistency_ignores_padding():
    model = peft_model(init_lora_weights=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".stable." in name:
                p.mul_(0.3)
    rows = batches(1)[0]
    ids = [rows["input_ids"][i, :n] for i, n in enumerate(rows["lengths"])]
    values = []
    for extra in (0, 7):
        padded = [torch.cat([r, torch.full((extra,), PAD)]) for r in ids]  # rows grow, lengths do not
        input_ids, _, _ = pad_rows(padded, padded, PAD)
        _, _, mask = pad_rows(ids, ids, PAD)
        mask = torch.nn.functional.pad(mask, (0, input_ids.shape[1] - mask.shape[1]))
        hidden = {}
        pair = AdapterPair(model)
        for name in (PLASTIC, STABLE):
            with pair.active(name), torch.no_grad():
                hidden[name] = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=[-1]).hidden_states
        values.append(consistency_loss([hidden[PLASTIC][-1]], [hidden[STABLE][-1]], mask).item())
        # garbage in padded positions changes nothing either
        noisy = hidden[PLASTIC][-1] + (1 - mask).unsqueeze(-1) * 100.0
        assert consistency_loss([noisy], [hidden[STABLE][-1]], mask).item() == pytest.approx(values[-1], rel=1e-6)
    assert values[0] > 0
    assert values[1] == pytest.approx(values[0], rel=1e-5)


def test_selective_update_skips_the_ema_when_plastic_is_not_better_by_the_margin():
    ilora = method(selective_update=True, min_update_threshold=1e6)
    initial = [t.detach().clone() for t in ilora.adapters.stable]
    train(ilora, batches(4))
    assert all(torch.equal(s, i) for s, i in zip(ilora.adapters.stable, initial))
    assert ilora.pop_logs()["ema_skipped"] == 1.0
    assert ilora.step == 4  # skipped updates still count as optimizer steps


def test_selective_update_applies_the_ema_when_plastic_is_better():
    ilora = method(selective_update=True, min_update_threshold=0.0)
    initial = [t.detach().clone() for t in ilora.adapters.stable]
    train(ilora, batches(4), lr=0.5)
    logs = ilora.pop_logs()
    assert logs["ema_skipped"] < 1.0
    assert any(not torch.equal(s, i) for s, i in zip(ilora.adapters.stable, initial))


def test_er_mode_has_replay_but_no_stable_pass():
    ilora = method(model=peft_model(with_stable=False), method="er")
    data = batches(3)
    train(ilora, data)
    assert len(ilora.buffer) == 12 and "consistency_loss" not in ilora.pop_logs()


def test_hidden_state_layers_out_of_range_is_an_error_at_start_up():
    with pytest.raises(ILoRAError, match=r"out of range.*3 hidden states"):
        method(hidden_state_layers=[3])
    with pytest.raises(ILoRAError, match="out of range"):
        method(hidden_state_layers=[-4])


def test_replay_rows_come_from_earlier_batches_and_buffer_fills():
    ilora = method(ilora_buffer_size=6)
    data = batches(4)
    train(ilora, data)
    assert len(ilora.buffer) == 6 and ilora.buffer.num_seen == 16
