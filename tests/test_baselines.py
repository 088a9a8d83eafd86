"""Each method's own behaviour on cases checkable by hand (the shared contract: test_methods_contract)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, method, peft_model, train

from ilora.core.adapters import PLASTIC, STABLE, AdapterPair, load_adapter, save_adapter
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import IGNORE_INDEX
from ilora.errors import TrainingDiverged
from ilora.methods.base import causal_lm_loss, split_rows, varies
from ilora.methods.derpp import DERppArguments, bytes_per_row, logit_mse, top_logits
from ilora.methods.ewc import EWCArguments, ewc_penalty
from ilora.methods.ilora import consistency_loss
from ilora.methods.lwf import TEACHER, LwF, distillation_loss
from ilora.methods.olora import OLoRA, orthogonality_loss


# ------------------------------------------------------------------- EWC
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_the_fisher():
    torch.manual_seed(0)
    anchor = [torch.randn(3, 4), torch.randn(5)]
    fisher = [torch.rand(3, 4), torch.rand(5)]
    assert ewc_penalty(anchor, fisher, anchor).item() == 0.0
    moved = [a + 0.1 for a in anchor]
    once = ewc_penalty(moved, fisher, anchor).item()
    assert once == pytest.approx(sum((f * 0.01).sum().item() for f in fisher), rel=1e-5)
    assert ewc_penalty(moved, [2 * f for f in fisher], anchor).item() == pytest.approx(2 * once, rel=1e-6)


def test_ewc_fisher_is_the_mean_squared_per_example_gradient_folded_online():
    ewc = method(
        model=peft_model(with_stable=False, init_lora_weights=False),
        method="ewc",
        options=EWCArguments(ewc_fisher_samples=3, ewc_gamma=0.5),
    )
    data = batches(2)
    rows = list(zip(*split_rows(data[0])))[:3]
    direct = [torch.zeros_like(t) for t in ewc.adapters.plastic]
    for ids, labels in rows:
        loss = causal_lm_loss(ewc.model(input_ids=ids[None]).logits, labels[None])
        for d, g in zip(direct, torch.autograd.grad(loss, ewc.adapters.plastic)):
            d += g**2 / 3
    ewc.end_of_task(data)
    for got, want in zip(ewc.fisher, direct):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert all(torch.equal(a, p) for a, p in zip(ewc.anchor, ewc.adapters.plastic))
    ewc.end_of_task(data)  # the same task again: F* = 0.5 * F + F
    for got, want in zip(ewc.fisher, direct):
        torch.testing.assert_close(got, 1.5 * want, rtol=1e-5, atol=1e-9)


def test_ewc_penalty_pulls_the_weights_back_toward_the_anchor():
    ewc = method(model=peft_model(with_stable=False), method="ewc", options=EWCArguments(ewc_lambda=1e6))
    ewc.fisher = [torch.ones_like(t) for t in ewc.adapters.plastic]
    ewc.anchor = [t.detach().clone() for t in ewc.adapters.plastic]
    free = method(model=peft_model(with_stable=False), method="seq_lora")
    train(ewc, batches(3), lr=1e-7)
    train(free, batches(3), lr=1e-7)
    drift = lambda m, ref: sum((t - r).abs().sum().item() for t, r in zip(m.adapters.plastic, ref))  # noqa: E731
    start = [t.detach().clone() for t in peft_model(with_stable=False).parameters() if t.requires_grad]
    assert drift(ewc, ewc.anchor) < drift(free, start)


# ------------------------------------------------------------------- LwF
def test_distillation_is_zero_when_student_equals_teacher_and_a_kl_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    assert distillation_loss(logits, logits.clone(), labels, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    teacher = torch.randn(2, 5, 7)
    got = distillation_loss(logits, teacher, labels, 2.0).item()
    # positions whose next token is labelled: row 0 -> 1, 2; row 1 -> 0, 1, 2, 3
    positions = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    want = sum(
        (
            F.softmax(teacher[r, c] / 2, -1)
            * (F.log_softmax(teacher[r, c] / 2, -1) - F.log_softmax(logits[r, c] / 2, -1))
        ).sum()
        for r, c in positions
    ) / len(positions)
    assert got == pytest.approx(want.item(), rel=1e-5)


def test_lwf_teacher_is_the_previous_adapter_frozen(tmp_path):
    model = peft_model(with_stable=False, init_lora_weights=False)
    save_adapter(model, PLASTIC, tmp_path / "previous")
    LwF.prepare_model(model, {PLASTIC: tmp_path / "previous"}, None, None)
    lwf = method(model=model, method="lwf")
    assert all(not p.requires_grad for n, p in model.named_parameters() if f".{TEACHER}." in n)
    lwf.loss(batches(1)[0])  # first step: student == teacher
    assert lwf.pop_logs()["distillation_loss"] == pytest.approx(0.0, abs=1e-7)
    train(lwf, batches(2), lr=0.5)
    lwf.loss(batches(1, offset=9)[0])
    assert lwf.pop_logs()["distillation_loss"] > 1e-6


# ----------------------------------------------------------------- DER++
def test_derpp_keeps_the_top_logits_of_response_tokens_and_they_round_trip_exactly(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(6, 11)
    labels = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX])
    kept = top_logits(logits, labels, 4)
    assert kept["logit_values"].shape == (2, 4)  # positions 2 and 3 predict the labelled tokens 3 and 4
    torch.testing.assert_close(kept["logit_values"].float(), logits[2:4].topk(4).values.half().float())
    buffer = ReplayBuffer(3, seed=0)
    for i in range(5):
        buffer.add(torch.arange(6) + i, labels.clone(), "t", top_logits(torch.randn(6, 11), labels, 4))
    buffer.save(tmp_path / "buffer")
    loaded = ReplayBuffer.load(tmp_path / "buffer")
    assert len(loaded.extras) == 3
    for a, b in zip(buffer.extras, loaded.extras):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert bytes_per_row(response_tokens=5, top_k=64) == 5 * 64 * 6


def test_derpp_logit_mse_is_zero_on_the_stored_logits_and_the_loss_has_all_three_terms():
    torch.manual_seed(0)
    logits = torch.randn(1, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX]])
    stored = [top_logits(logits[0], labels[0], 11)]
    assert logit_mse(logits, labels, stored).item() == pytest.approx(0.0, abs=1e-5)  # float16 storage
    assert logit_mse(logits + 1.0, labels, stored).item() == pytest.approx(1.0, abs=1e-3)
    derpp = method(model=peft_model(with_stable=False), method="derpp", options=DERppArguments(derpp_top_k=5))
    train(derpp, batches(2))
    derpp.loss(batches(1, offset=20)[0])
    logs = derpp.pop_logs()
    assert {"ce_loss", "logit_mse", "replay_ce_loss"} <= logs.keys()
    assert all(row["logit_values"].shape[-1] == 5 for row in derpp.buffer.extras)
    kept = sum(row["logit_values"].shape[0] for row in derpp.buffer.extras) / len(derpp.buffer)
    assert derpp.buffer.bytes_per_row()["extras"] == pytest.approx(bytes_per_row(kept, 5))


# ----------------------------------------------------------------- O-LoRA
def _olora_model(tmp_path):
    """A model with t1's LoRA frozen as olora-1 and a fresh plastic LoRA, as O-LoRA's task 2 starts."""
    model = peft_model(with_stable=False, init_lora_weights=False)
    save_adapter(model, PLASTIC, tmp_path / "t1")
    OLoRA.prepare_model(model, {PLASTIC: tmp_path / "t1"}, None, None)
    return model


def test_olora_orthogonality_is_zero_for_orthogonal_subspaces_and_l1_otherwise(tmp_path):
    model = _olora_model(tmp_path)
    layers = AdapterPair(model).layers
    with torch.no_grad():
        for layer in layers:
            r, d = layer.lora_A[PLASTIC].weight.shape
            eye = torch.eye(d)
            layer.lora_A["olora-1"].weight.copy_(eye[:r])  # rows e_0..e_{r-1}
            layer.lora_A[PLASTIC].weight.copy_(2 * eye[r : 2 * r])  # rows e_r..e_{2r-1}
    assert orthogonality_loss(layers, ["olora-1"]).item() == 0.0
    with torch.no_grad():
        layers[0].lora_A[PLASTIC].weight[0, 0] = 3.0  # overlaps e_0 once: |A_old A_new^T| gains 3
    assert orthogonality_loss(layers, ["olora-1"]).item() == pytest.approx(3.0)


def test_olora_forward_sums_every_tasks_lora_and_only_the_new_one_trains(tmp_path):
    model = _olora_model(tmp_path)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".olora-1." in n)
    fresh = [m for m in AdapterPair(model).layers][0]
    assert torch.count_nonzero(fresh.lora_B[PLASTIC].weight) == 0  # a new LoRA starts at zero
    with torch.no_grad():
        fresh.lora_B[PLASTIC].weight.normal_()
    pair, x = AdapterPair(model), torch.randn(3, fresh.in_features)
    with torch.no_grad():
        base = fresh.get_base_layer()(x)
        outs = {}
        for names in (["olora-1"], [PLASTIC], ["olora-1", PLASTIC]):
            with pair.active(names):
                outs[tuple(names)] = fresh(x)
    summed = base + (outs[("olora-1",)] - base) + (outs[(PLASTIC,)] - base)
    torch.testing.assert_close(outs[("olora-1", PLASTIC)], summed, rtol=1e-5, atol=1e-6)
    assert OLoRA.evaluated(model, None) == {PLASTIC: ["olora-1", PLASTIC]}


# ------------------------------------------- I-LoRA's official-code options
def _with_replay(**args):
    ilora = method(model=peft_model(init_lora_weights=False), **args)
    replay = batches(1, offset=100)[0]
    for i, n in enumerate(replay["lengths"]):
        ilora.buffer.add(replay["input_ids"][i, :n], replay["labels"][i, :n])
    ilora.buffer.capacity = len(ilora.buffer)
    with torch.no_grad():
        for t in ilora.adapters.stable:
            t.mul_(0.5)  # the adapters differ, in both directions of the hidden states
    return ilora, replay


def _hidden(ilora, rows, name):
    with torch.no_grad(), ilora.adapters.active(name):
        return ilora.model(
            input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], output_hidden_states=True
        ).hidden_states


def test_consistency_target_max_is_the_elementwise_maximum_of_plastic_and_stable():
    ilora, replay = _with_replay(ilora_consistency_target="max")
    ilora.loss(batches(1)[0])
    plastic, stable = _hidden(ilora, replay, PLASTIC)[-1], _hidden(ilora, replay, STABLE)[-1]
    target = torch.where(plastic > stable, plastic, stable)
    mask = replay["attention_mask"].bool()
    want = ((plastic - target)[mask] ** 2).mean().item()
    assert ilora.pop_logs()["consistency_loss"] == pytest.approx(want, rel=1e-4)
    assert want < ((plastic - stable)[mask] ** 2).mean().item()  # max only counts where stable is higher


def test_hidden_state_layers_all_averages_every_hidden_state():
    ilora, replay = _with_replay(hidden_state_layers=["all"])
    ilora.loss(batches(1)[0])
    plastic, stable = _hidden(ilora, replay, PLASTIC), _hidden(ilora, replay, STABLE)
    want = consistency_loss(list(plastic), list(stable), replay["attention_mask"]).item()
    assert len(plastic) == 3 and ilora.pop_logs()["consistency_loss"] == pytest.approx(want, rel=1e-4)


def test_replay_loss_mean_of_parts_is_the_mean_of_current_and_replay_losses():
    ilora, replay = _with_replay(ilora_replay_loss="mean_of_parts", consistency_weight=0.0)
    current = batches(1)[0]
    ilora.loss(current)
    with torch.no_grad():
        parts = [
            causal_lm_loss(
                ilora.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
            )
            for b in (current, replay)
        ]
    assert ilora.pop_logs()["ce_loss"] == pytest.approx(((parts[0] + parts[1]) / 2).item(), rel=1e-5)


def test_easycl_use_ilora_false_is_sequential_lora_and_a_contradiction_is_refused():
    from ilora import ContinualArguments, ILoRAError, methods
    from ilora.config.parse import parse_train_args

    assert ContinualArguments(use_ilora=False).method == "seq_lora"
    assert ContinualArguments(use_ilora=False, method="er").method == "er"  # not I-LoRA either: consistent
    classes = methods.argument_classes()
    assert parse_train_args(["--use_ilora", "false", "--output_dir", "x"], classes).method == "seq_lora"
    with pytest.raises(ILoRAError, match="use_ilora=false contradicts method=ilora"):
        parse_train_args(["--use_ilora", "false", "--method", "ilora", "--output_dir", "x"], classes)


def test_load_adapter_freezes_what_it_loads(tmp_path):
    model = peft_model(with_stable=False)
    save_adapter(model, PLASTIC, tmp_path / "a")
    load_adapter(model, "other", tmp_path / "a")
    assert all(p.requires_grad == (".plastic." in n) for n, p in model.named_parameters() if "lora_" in n)


def test_pure_modules_import_nothing_heavy():
    """`import ilora.metrics` (and the method registry) must not pull in torch, transformers or peft."""
    import subprocess
    import sys

    code = (
        "import sys, ilora.evaluation.metrics, ilora.methods, ilora.store.paths, ilora.errors; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------- divergence and collapse
def _zero_lm_head(m):
    m.model.get_base_model().lm_head.weight.data.zero_()  # every position: the same (zero) logits


def _confidently_wrong(m):
    """With the adapters on, logits flipped and sharpened: finite, input-dependent, far worse than untrained."""
    layer = m.adapters.layers[0]
    m.model.get_base_model().lm_head.register_forward_hook(
        lambda mod, i, out: out if layer.disable_adapters else -50 * out
    )


def _exploded(m):
    m.adapters.plastic[0].data[0, 0] = 2e6


def _nan(m):
    m.adapters.stable[0].data[0, 0] = float("nan")


COLLAPSES = {
    "logits constant across positions": (_zero_lm_head, "the plastic model's outputs no longer depend on its input"),
    "loss far above the untrained model's": (
        _confidently_wrong,
        "loss on its training rows is far above the untrained",
    ),
    "an adapter weight past the limit": (_exploded, "an adapter weight grew past 1e+06"),
    "a NaN in the stable adapter": (_nan, "a loss or adapter weight became NaN or inf"),
}


def _trained(name: str = "ilora"):
    m = method(method=name, model=peft_model(init_lora_weights=False))
    train(m, batches(3), lr=0.05)
    return m


@pytest.mark.parametrize("name", ["ilora", "er"])
def test_a_healthy_trained_model_passes_and_records_its_margins(name):
    m = _trained(name)
    m.check_diverged("by the end of the task", adapters=True, outputs=True)
    figures = {k: float(v) for k, v in m.collapse_figures.items()}
    assert set(figures) == {"untrained_loss", "uniform_loss", *(f"{r}_loss" for r in m.evaluated(m.model, m.args))}
    assert figures["plastic_loss"] < max(figures["untrained_loss"], figures["uniform_loss"])


@pytest.mark.parametrize("case", list(COLLAPSES))
def test_a_collapsed_or_exploded_model_is_refused_naming_the_reason(case):
    damage, reason = COLLAPSES[case]
    m = _trained()
    damage(m)
    with pytest.raises(TrainingDiverged, match="by the end of the task") as refused:
        m.check_diverged("by the end of the task", adapters=True, outputs=True)
    assert reason in str(refused.value)


def test_varies_looks_only_at_real_positions():
    mask = torch.tensor([[1, 1, 0]])
    constant = torch.tensor([[[1.0, 2.0], [1.0, 2.0], [9.0, 0.0]]])  # the padded position differs
    assert not varies(constant, mask)
    assert varies(constant, torch.ones(1, 3))
    assert varies(constant[:, :1], mask[:, :1])  # one position tells nothing
    assert varies(torch.full((1, 2, 2), float("nan")), mask[:, :2])  # NaN is the finite check's
    assert not varies(torch.tensor([[[1e18, 3.0], [1e18 + 1e14, 3.0]]]), mask[:, :2])  # saturated
