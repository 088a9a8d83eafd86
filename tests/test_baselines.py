"""Each method's own behaviour on cases checkable by hand (the shared contract: test_methods_contract)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, method, peft_model, train

from ilora import methods
from ilora.core.adapters import PLASTIC, STABLE, AdapterPair, load_adapter, save_adapter
from ilora.core.buffer import ReplayBuffer
from ilora.data.encode import IGNORE_INDEX
from ilora.errors import ILoRAError, TrainingDiverged
from ilora.methods.base import causal_lm_loss, evaluating, split_rows, varies
from ilora.methods.derpp import DERppArguments, bytes_per_row, logit_mse, top_logits
from ilora.methods.ewc import EWCArguments, ewc_penalty
from ilora.methods.ilora import consistency_loss
from ilora.methods.inflora import REMOVE, RETAIN, InfLoRAArguments, compact, first_basis, grow
from ilora.methods.lwf import TEACHER, LwF, distillation_loss
from ilora.methods.magmax import MERGED, MagMax, MagMaxArguments, max_magnitude
from ilora.methods.nlora import NLoRA, NLoRAArguments, sparsity_loss
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


# ----------------------------------------------------------------- N-LoRA
def test_nlora_sparsity_is_the_l1_norm_of_each_modules_dense_update(tmp_path):
    model = peft_model(with_stable=False, init_lora_weights=False)
    save_adapter(model, PLASTIC, tmp_path / "t1")
    NLoRA.prepare_model(model, {PLASTIC: tmp_path / "t1"}, None, None)
    layers = AdapterPair(model).layers
    assert sparsity_loss(layers).item() == 0.0  # a fresh LoRA (B = 0) has changed nothing
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[PLASTIC].weight.normal_()
            layer.lora_B["nlora-1"].weight.normal_()  # the frozen earlier LoRA is not penalised
    direct, params = 0.0, dict(model.named_parameters())
    with torch.no_grad():  # entry by entry: (B A)_ij = B_i . A_:j
        for name, b in params.items():
            if name.endswith(f"lora_B.{PLASTIC}.weight"):
                a = params[name.replace("lora_B", "lora_A")]
                direct += sum(abs(float(b[i] @ a[:, j])) for i in range(b.shape[0]) for j in range(a.shape[1]))
    assert sparsity_loss(layers).item() == pytest.approx(direct, rel=1e-4)
    assert NLoRA.evaluated(model, None) == {PLASTIC: ["nlora-1", PLASTIC]}


def test_nlora_loss_adds_lambda_times_the_sparsity_and_trains_only_the_new_lora(tmp_path):
    model = peft_model(with_stable=False, init_lora_weights=False)
    save_adapter(model, PLASTIC, tmp_path / "t1")
    NLoRA.prepare_model(model, {PLASTIC: tmp_path / "t1"}, None, None)
    with torch.no_grad():
        for layer in AdapterPair(model).layers:
            layer.lora_B[PLASTIC].weight.normal_()
    losses = {}
    for weight in (0.0, 0.25):
        nlora = method(model=model, method="nlora", options=NLoRAArguments(nlora_lambda1=weight))
        losses[weight] = nlora.loss(batches(1)[0])
    penalty = sparsity_loss(AdapterPair(model).layers)
    torch.testing.assert_close(losses[0.25], losses[0.0] + 0.25 * penalty, rtol=1e-5, atol=1e-5)
    losses[0.25].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(f".{PLASTIC}." in n for n in grads)


# ------------------------------------------------------------ replay policies
@pytest.mark.parametrize("name", ["er", "ilora", "derpp"])
def test_surprise_is_each_rows_mean_token_loss_before_the_step_that_trains_on_it(name):
    buffer = ReplayBuffer(50, policy="surprise")
    replaying = method(model=peft_model(with_stable=name == "ilora"), method=name, buffer=buffer)
    data = batches(2)
    for batch in data:
        ids, labels = split_rows(batch)
        with torch.no_grad():  # the model as the step finds it, row by row
            expected = [
                causal_lm_loss(replaying.model(input_ids=x[None]).logits, y[None]).item() for x, y in zip(ids, labels)
            ]
        offered = len(buffer)
        train(replaying, [batch])
        assert buffer.priorities[offered:] == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- InfLoRA
def _inflora(tmp_path=None, **options):
    """InfLoRA on the tiny model: its first task, or (`tmp_path`) its second, task 1's LoRA frozen."""
    model = peft_model(with_stable=False, init_lora_weights=False)
    if tmp_path is not None:
        save_adapter(model, PLASTIC, tmp_path / "t1")
        methods.get("inflora").prepare_model(model, {PLASTIC: tmp_path / "t1"}, None, None)
    return method(model=model, method="inflora", options=InfLoRAArguments(**options))


def test_inflora_covariance_is_the_mean_outer_product_of_a_modules_real_input_tokens():
    inflora = _inflora()
    data = batches(2)
    covariance = inflora.input_covariances(data)[0]  # the first adapted module: layer 0's q_proj
    base = inflora.model.base_model.model.model
    with torch.no_grad():
        rows = []
        for batch in data:
            x = base.layers[0].input_layernorm(base.embed_tokens(batch["input_ids"]))
            rows.append(x[batch["attention_mask"].bool()])
        x = torch.cat(rows)
    torch.testing.assert_close(covariance, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_inflora_designs_a_outside_the_earlier_subspace_and_trains_only_b(tmp_path):
    inflora = _inflora(tmp_path)
    width = inflora.adapters.layers[0].in_features
    protected = torch.linalg.qr(torch.randn(width, 5, generator=torch.Generator().manual_seed(0))).Q
    inflora.bases, inflora.kinds = [protected] * len(inflora.adapters.layers), [REMOVE] * len(inflora.adapters.layers)
    data = batches(2)
    covariances = inflora.input_covariances(data)
    inflora.start_of_task(data)
    for layer, covariance in zip(inflora.adapters.layers, covariances):
        down = layer.lora_A[PLASTIC].weight.detach()
        rank = down.shape[0]
        torch.testing.assert_close(down @ protected, torch.zeros(rank, 5), atol=1e-5, rtol=0)
        torch.testing.assert_close(down @ down.T, torch.eye(rank) / 3, atol=1e-5, rtol=0)
        outside = covariance - protected @ (protected.T @ covariance)
        top = torch.linalg.svd(outside).U[:, :rank]  # the same rows up to sign
        torch.testing.assert_close((down @ top).abs(), torch.eye(rank) / 3**0.5, atol=1e-4, rtol=0)
    slots = dict(zip(map(id, inflora.adapters.plastic), inflora.adapters.slots))
    assert {slots[id(t)] for t in inflora.trained_tensors()} == {"lora_B"}
    before = [t.detach().clone() for t in inflora.adapters.plastic]
    train(inflora, batches(2, offset=30))
    for tensor, old, slot in zip(inflora.adapters.plastic, before, inflora.adapters.slots):
        assert torch.equal(tensor, old) == (slot == "lora_A"), slot


def test_inflora_with_a_retained_free_subspace_designs_a_inside_it(tmp_path):
    inflora = _inflora(tmp_path)
    width = inflora.adapters.layers[0].in_features
    free = torch.linalg.qr(torch.randn(width, 6, generator=torch.Generator().manual_seed(1))).Q
    inflora.bases, inflora.kinds = [free] * len(inflora.adapters.layers), [RETAIN] * len(inflora.adapters.layers)
    inflora.start_of_task(batches(2))
    for layer in inflora.adapters.layers:
        down = layer.lora_A[PLASTIC].weight.detach()
        torch.testing.assert_close(down, down @ free @ free.T, atol=1e-5, rtol=0)


def test_dualgpm_counts_directions_by_their_share_of_the_input_energy():
    covariance = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5, 0.25, 0.0, 0.0, 0.0]))
    # shares of the singular values 0.516, 0.258, 0.129, 0.065, 0.032: cumulative 0.516, 0.774, 0.903, 0.968, 1
    basis, kind = first_basis(covariance, 0.9)
    assert kind == REMOVE and basis.shape == (8, 2)  # the official count: below the threshold
    grown, kind = grow(covariance, basis, REMOVE, 0.9)  # 0.774 held: one more reaches 0.903
    assert kind == REMOVE and grown.shape == (8, 3)
    grown, _ = grow(covariance, grown, REMOVE, 0.99)  # 0.903, 0.968, then 1
    assert grown.shape == (8, 5)
    torch.testing.assert_close(grown.T @ grown, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(grow(covariance, grown, REMOVE, 0.9)[0], grown)  # already held: unchanged
    wide, kind = compact(grown, REMOVE)  # 5 of 8 dimensions: kept as the 3 free ones
    assert kind == RETAIN and wide.shape == (8, 3)
    torch.testing.assert_close(grown.T @ wide, torch.zeros(5, 3), atol=1e-5, rtol=0)
    # directions 0 and 1 held (0.774), 2..7 free: the free share 0.226 must fall below 0.01: 2, 3, 4 taken
    free, kind = grow(covariance, torch.eye(8)[:, 2:], RETAIN, 0.99)
    assert kind == RETAIN and free.shape == (8, 3)
    torch.testing.assert_close(free[:5], torch.zeros(5, 3), atol=1e-6, rtol=0)


def test_inflora_state_round_trips_and_a_mismatched_one_is_refused(tmp_path):
    inflora = _inflora()
    inflora.end_of_task(batches(2))
    tensors, record = inflora.state()
    again = _inflora()
    again.load_state(tensors, record)
    assert again.kinds == inflora.kinds and all(torch.equal(a, b) for a, b in zip(again.bases, inflora.bases))
    with pytest.raises(ILoRAError, match="InfLoRA: the previous task's subspaces do not match"):
        again.load_state({k: v[:-1] for k, v in tensors.items()}, record)


# ----------------------------------------------------------------- MagMax
def test_max_magnitude_keeps_each_entrys_largest_change_and_a_tie_goes_to_the_later_task():
    first, second, third = torch.tensor([1.0, -3.0, 2.0, 0.5]), torch.tensor([-2.0, 1.0, -2.0, 0.0]), torch.zeros(4)
    torch.testing.assert_close(max_magnitude([first, second]), torch.tensor([-2.0, -3.0, -2.0, 0.5]))
    torch.testing.assert_close(max_magnitude([first, second, third]), torch.tensor([-2.0, -3.0, -2.0, 0.5]))
    assert torch.equal(max_magnitude([first]), first)


def _magmax_second_task(tmp_path):
    """MagMax's task 2 as it starts: t1's LoRA frozen as magmax-1, the plastic LoRA going on from it."""
    model = peft_model(with_stable=False, init_lora_weights=False)
    save_adapter(model, PLASTIC, tmp_path / "t1")
    first = {n: p.detach().clone() for n, p in model.named_parameters() if f".{PLASTIC}." in n}
    MagMax.prepare_model(model, {PLASTIC: tmp_path / "t1"}, None, None)
    return model, first


def test_magmax_trains_on_from_the_previous_tasks_lora_and_keeps_a_frozen_copy(tmp_path):
    model, first = _magmax_second_task(tmp_path)
    params = dict(model.named_parameters())
    for name, value in first.items():
        assert torch.equal(params[name], value)  # sequential fine-tuning: not reset
        assert torch.equal(params[name.replace(f".{PLASTIC}.", ".magmax-1.")], value)
        assert not params[name.replace(f".{PLASTIC}.", ".magmax-1.")].requires_grad
    assert MagMax.saved_adapters(None, [PLASTIC]) == [PLASTIC, "magmax-1"]
    assert MagMax.saved_adapters(None, [PLASTIC, "magmax-1"]) == [PLASTIC, "magmax-1", "magmax-2"]


def test_magmax_merged_model_is_the_base_plus_scaled_max_magnitude_task_vectors(tmp_path):
    model, _ = _magmax_second_task(tmp_path)
    torch.manual_seed(2)
    with torch.no_grad():
        for layer in AdapterPair(model).layers:
            layer.lora_B[PLASTIC].weight.normal_()
    options = MagMaxArguments(magmax_scaling=0.5)
    ids = batches(1)[0]["input_ids"]
    with torch.no_grad(), evaluating(MagMax, model, MERGED, options):
        merged = model(input_ids=ids).logits
    with torch.no_grad(), evaluating(MagMax, model, PLASTIC, options):
        plastic = model(input_ids=ids).logits
    reference = peft_model(with_stable=False)  # the same base weights (seed 0), merged by hand
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, target in reference.named_modules():
            layer = modules.get(name)
            if layer is not None and hasattr(layer, "lora_A") and PLASTIC in layer.lora_A:
                task_vectors = []
                for adapter in ("magmax-1", PLASTIC):
                    b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
                    task_vectors.append(layer.scaling[adapter] * b @ a)
                one, two = task_vectors
                target.base_layer.weight += 0.5 * torch.where(two.abs() >= one.abs(), two, one)
        with reference.disable_adapter():
            expected = reference(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(merged, plastic, atol=1e-4)
    assert MagMax.merged_weights(model, PLASTIC, options) is None


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
