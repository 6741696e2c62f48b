"""SALTrainer keeps the Trainer's features while applying the SAL update."""

import warnings

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import tiny_mlp
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    EvalPrediction,
    GPT2Config,
    GPT2LMHeadModel,
)

from sal_hf import (
    MLPClassifierConfig,
    MLPForImageClassification,
    SALConfig,
    convert_to_sal,
    get_controller,
)
from sal_hf.trainer import SALTrainer, SALTrainingArguments, accuracy_metrics


def toy_dataset(rows: int = 64, features: int = 5, classes: int = 3, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(rows, features, generator=generator)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return Dataset.from_dict({"pixel_values": inputs.numpy(), "labels": labels.numpy()}) \
        .with_format("torch").filter(lambda row: row["labels"] < classes)


def arguments(tmp_path, **overrides) -> SALTrainingArguments:
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2,
        max_steps=6, logging_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0,
    )
    values.update(overrides)
    return SALTrainingArguments(**values)


def test_plain_model_is_refused_with_a_hint(tmp_path):
    model = MLPForImageClassification(MLPClassifierConfig(input_size=5, num_labels=3))
    with pytest.raises(ValueError, match="convert_to_sal"):
        SALTrainer(model=model, args=arguments(tmp_path))


def test_one_backward_per_optimizer_step(tmp_path):
    trainer = SALTrainer(model=tiny_mlp(num_areas=2), args=arguments(tmp_path),
                         train_dataset=toy_dataset())
    calls = []
    original = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kw: (calls.append(1), original(loss, **kw))
    trainer.train()
    assert trainer.state.global_step == 6
    assert len(calls) == 6


def test_prototypes_and_feedback_are_unchanged_by_training(tmp_path):
    model = tiny_mlp(num_areas=2)
    controller = get_controller(model)
    frozen = {n: b.clone() for n, b in controller.named_buffers() if "prototypes" in n
              or n.startswith("feedback.")}
    trainer = SALTrainer(model=model, args=arguments(tmp_path), train_dataset=toy_dataset())
    trainer.train()
    assert len(frozen) == 4  # 2 routers' prototypes, 2 regions' feedback matrices
    for name, before in frozen.items():
        assert torch.equal(dict(controller.named_buffers())[name], before), name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("prototypes" in n or "feedback" in n for n in trainable)


def test_frozen_buffers_regenerate_identically_from_the_seed():
    first, second = tiny_mlp(num_areas=2, seed=7), tiny_mlp(num_areas=2, seed=7)
    for (name, a), (_, b) in zip(get_controller(first).named_buffers(),
                                 get_controller(second).named_buffers(), strict=True):
        if "prototypes" in name or name.startswith("feedback."):
            assert torch.equal(a, b), name
    other = tiny_mlp(num_areas=2, seed=8)
    assert not torch.equal(get_controller(other).feedback.matrices(0),
                           get_controller(first).feedback.matrices(0))


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    # DFA (no router): two micro-batches of 8 give the same step as one batch of 16.
    results = []
    for batch, accumulation in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        model = tiny_mlp(method="dfa")
        args = arguments(tmp_path / str(batch), per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                         max_grad_norm=0.0)
        SALTrainer(model=model, args=args, train_dataset=toy_dataset()).train()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_training_logs_both_losses_and_area_usage(tmp_path):
    trainer = SALTrainer(model=tiny_mlp(num_areas=2), args=arguments(tmp_path),
                         train_dataset=toy_dataset())
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {"task_loss", "router_loss", "area_entropy/layers.0",
            "area_max_share/layers.1"} <= set(logged)


def test_evaluation_reports_accuracy_and_usage_fractions(tmp_path):
    dataset = toy_dataset()
    trainer = SALTrainer(model=tiny_mlp(num_areas=2), args=arguments(tmp_path),
                         train_dataset=dataset)
    metrics = trainer.evaluate(dataset)
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert set(trainer.last_area_usage) == {"layers.0", "layers.1"}
    for fractions in trainer.last_area_usage.values():
        assert len(fractions) == 2 and sum(fractions) == pytest.approx(1.0)


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    def run(folder, max_steps, resume=None):
        torch.manual_seed(0)
        model = tiny_mlp(num_areas=2)
        args = arguments(folder, max_steps=max_steps, save_strategy="steps", save_steps=3,
                         lr_scheduler_type="constant")
        trainer = SALTrainer(model=model, args=args, train_dataset=toy_dataset())
        trainer.train(resume_from_checkpoint=resume)
        return model.state_dict()

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "interrupted", 3)
    resumed = run(tmp_path / "interrupted", 6, resume=str(tmp_path / "interrupted/checkpoint-3"))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_area_weights_train_at_one_over_sqrt_areas_by_default(tmp_path):
    model = tiny_mlp(num_areas=4)
    trainer = SALTrainer(model=model, args=arguments(tmp_path, learning_rate=0.02),
                         train_dataset=toy_dataset())
    optimizer = trainer.create_optimizer()
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rate_of[id(model.layers[0].dense.weight)] == pytest.approx(0.01)  # 0.02 / sqrt(4)
    assert rate_of[id(model.classifier.weight)] == pytest.approx(0.02)
    assert rate_of[id(model.sal_controller.routers["0"].projection.weight)] == pytest.approx(0.02)
    assert len({id(p) for g in optimizer.param_groups for p in g["params"]}) == len(
        list(model.parameters())
    )


def test_area_learning_rate_scale_can_be_set_and_is_validated(tmp_path):
    model = tiny_mlp(num_areas=4)
    args = arguments(tmp_path, learning_rate=0.02, area_learning_rate_scale=1.0)
    optimizer = SALTrainer(model=model, args=args, train_dataset=toy_dataset()).create_optimizer()
    assert {group["lr"] for group in optimizer.param_groups} == {0.02}
    with pytest.raises(ValueError, match="area_learning_rate_scale must be > 0, got -1"):
        arguments(tmp_path, area_learning_rate_scale=-1.0)


def test_a_second_create_optimizer_call_does_not_scale_the_rates_again(tmp_path):
    # DeepSpeed's set-up calls create_optimizer twice (deepspeed_init, then before prepare).
    model = tiny_mlp(num_areas=4, residual=True, num_layers=3)
    args = arguments(tmp_path, learning_rate=0.02, head_learning_rate_scale=5.0)
    trainer = SALTrainer(model=model, args=args, train_dataset=toy_dataset())

    def groups() -> list[tuple[float, int]]:
        return [(group["lr"], len(group["params"]))
                for group in trainer.create_optimizer().param_groups]

    first = groups()
    again = groups()
    assert again == first
    assert sorted({rate for rate, _ in again}) == pytest.approx([0.01, 0.02, 0.1])


def test_an_fsdp_request_that_accelerate_drops_is_warned_about(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what an FSDP accelerate config sets
    with caplog.at_level("WARNING", logger="sal_hf.trainer"):
        SALTrainer(model=tiny_mlp(num_areas=2), args=arguments(tmp_path),
                   train_dataset=toy_dataset())
    assert "FSDP was requested but Accelerate runs NO on 1 process(es)" in caplog.text


def test_several_processes_that_accelerate_does_not_distribute_are_refused(tmp_path, monkeypatch):
    # What `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml` gives each process
    # without ACCELERATE_USE_CPU=1: torchrun's WORLD_SIZE=2, Accelerate's distributed type NO.
    # The arguments are built before WORLD_SIZE is set, and without `use_cpu`: otherwise
    # Accelerate would look for a real process group.
    args = arguments(tmp_path, use_cpu=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = r"WORLD_SIZE=2 but Accelerate's distributed type is NO: .* ACCELERATE_USE_CPU=1"
    with pytest.raises(RuntimeError, match=expected):
        SALTrainer(model=tiny_mlp(num_areas=2), args=args, train_dataset=toy_dataset())


def test_head_learning_rate_scale_moves_only_the_head(tmp_path):
    model = tiny_mlp(num_areas=4, residual=True, num_layers=3)
    args = arguments(tmp_path, learning_rate=0.02, head_learning_rate_scale=5.0)
    optimizer = SALTrainer(model=model, args=args, train_dataset=toy_dataset()).create_optimizer()
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert rate_of[id(model.classifier.weight)] == pytest.approx(0.1)
    assert rate_of[id(model.classifier.bias)] == pytest.approx(0.1)
    assert rate_of[id(model.layers[1].dense.weight)] == pytest.approx(0.01)  # areas: 1/sqrt(4)
    assert rate_of[id(model.sal_controller.routers["1"].projection.weight)] == pytest.approx(0.02)
    assert len(rate_of) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="head_learning_rate_scale must be > 0, got 0"):
        arguments(tmp_path, head_learning_rate_scale=0.0)


def test_sal_output_hooks_run_after_hooks_added_later_once_training_begins(tmp_path):
    # A wrapper added after conversion (DeepSpeed ZeRO-3's hooks) must see the region output
    # before SAL puts its feedback on it.
    model = tiny_mlp(num_areas=2)
    seen = []
    for layer in model.layers:
        layer.register_forward_hook(lambda module, args, output: seen.append(output.grad_fn))
    trainer = SALTrainer(model=model, args=arguments(tmp_path, max_steps=1),
                         train_dataset=toy_dataset())
    model.train()(torch.randn(4, 5))
    assert all("FeedbackInjector" in type(fn).__name__ for fn in seen)  # SAL's hook ran first
    seen.clear()
    trainer.train()
    assert seen and not any("FeedbackInjector" in type(fn).__name__ for fn in seen)


def test_language_models_get_no_accuracy_metric(tmp_path):
    # GPT2LMHeadModel's name says neither CausalLM nor MaskedLM; its unshifted "accuracy" would
    # score a model that repeats its input.
    config = GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=8)
    model = convert_to_sal(GPT2LMHeadModel(config), SALConfig(num_areas=2, routing_dim=4))
    trainer = SALTrainer(model=model, args=arguments(tmp_path))
    assert trainer.compute_metrics is None


def _bert(**config) -> torch.nn.Module:
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=16, **config)
    return convert_to_sal(BertForSequenceClassification(config), SALConfig(method="dfa"))


@pytest.mark.parametrize(
    "config, expected",
    [(dict(num_labels=3), True),
     (dict(num_labels=3, architectures=["BertForMaskedLM"]), True),  # loaded from an MLM
     (dict(num_labels=1), False),  # regression
     (dict(num_labels=3, problem_type="multi_label_classification"), False)],
)
def test_accuracy_is_added_for_single_label_classifiers_only(tmp_path, config, expected):
    trainer = SALTrainer(model=_bert(**config), args=arguments(tmp_path))
    assert (trainer.compute_metrics is accuracy_metrics) is expected


def test_accuracy_ignores_positions_labelled_minus_100():
    prediction = EvalPrediction(predictions=np.array([[1, 2, 0], [3, 3, 3]]),
                                label_ids=np.array([[1, -100, 0], [3, 0, -100]]))
    assert accuracy_metrics(prediction) == {"accuracy": 0.75}
    nothing_counted = EvalPrediction(predictions=np.array([1, 2]), label_ids=np.array([-100] * 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(accuracy_metrics(nothing_counted)["accuracy"])


@pytest.mark.parametrize("accumulation", [1, 4])
def test_logged_task_loss_is_the_step_mean_whatever_the_accumulation(tmp_path, accumulation):
    # A language model's loss is normalised over the whole accumulated batch (it takes
    # num_items_in_batch); the logged task loss must not shrink with the number of micro-batches.
    config = GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = convert_to_sal(GPT2LMHeadModel(config), SALConfig(method="dfa"))
    ids = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the mean over the 16 x 7 next-token predictions
        mean_loss = model(input_ids=ids, labels=ids).loss.item()
    dataset = Dataset.from_dict({"input_ids": ids.numpy(), "labels": ids.numpy()})
    args = arguments(tmp_path, per_device_train_batch_size=16 // accumulation, max_steps=1,
                     logging_steps=1, gradient_accumulation_steps=accumulation,
                     learning_rate=0.0)
    trainer = SALTrainer(model=model, args=args, train_dataset=dataset.with_format("torch"))
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "task_loss" in entry)
    # The Trainer's loss for a step is the sum over its predictions divided by its number of
    # labels, which it counts unshifted: 16 x 8 labels for 16 x 7 predictions.
    assert logged["task_loss"] == pytest.approx(mean_loss * 7 / 8, rel=1e-5)
    assert logged["task_loss"] == pytest.approx(logged["loss"], abs=1e-4)  # logged rounded


def _first_step_losses(tmp_path, model, dataset, accumulation, **trainer_kwargs) -> dict:
    args = arguments(tmp_path, per_device_train_batch_size=16 // accumulation, max_steps=1,
                     logging_steps=1, gradient_accumulation_steps=accumulation,
                     learning_rate=0.0)
    trainer = SALTrainer(model=model, args=args, train_dataset=dataset.with_format("torch"),
                         **trainer_kwargs)
    trainer.train()
    return next(entry for entry in trainer.state.log_history if "task_loss" in entry)


def _sum_over_items(outputs, labels, num_items_in_batch=None):
    total = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum")
    return total / (labels.numel() if num_items_in_batch is None else num_items_in_batch)


@pytest.mark.parametrize("accumulation", [2, 4])
def test_task_loss_of_a_compute_loss_func_is_the_step_mean_whatever_the_accumulation(
    tmp_path, accumulation
):
    # A `compute_loss_func` normalises over the accumulated batch, so the Trainer does not divide
    # its loss; the logged task loss must follow the same rule.
    # DFA: no router, whose batch-centred routing would differ between micro-batch sizes.
    dataset = toy_dataset(rows=16)
    losses = []
    for folder, steps in (("1", 1), ("n", accumulation)):
        torch.manual_seed(0)
        losses.append(_first_step_losses(tmp_path / folder, tiny_mlp(method="dfa"), dataset,
                                         steps, compute_loss_func=_sum_over_items))
    reference, logged = losses
    assert logged["task_loss"] == pytest.approx(reference["task_loss"], rel=1e-5)
    assert logged["loss"] == pytest.approx(reference["loss"], abs=2e-4)


def _tiny_bert_classifier() -> torch.nn.Module:
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=12, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return convert_to_sal(BertForSequenceClassification(config), SALConfig(method="dfa"))


@pytest.mark.parametrize("accumulation", [2, 4])
def test_a_bert_classifier_loss_is_divided_by_the_accumulation_steps(tmp_path, accumulation):
    # BERT's classification loss is a plain mean that ignores num_items_in_batch although its
    # forward takes **kwargs; without `accepts_loss_kwargs = False` the Trainer would not divide
    # it and the step's loss would grow with the number of micro-batches.
    ids = torch.randint(1, 40, (16, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 3
    dataset = Dataset.from_dict({"input_ids": ids.numpy(), "labels": labels.numpy()})
    reference = _first_step_losses(tmp_path / "1", _tiny_bert_classifier(), dataset, 1)
    logged = _first_step_losses(tmp_path / "n", _tiny_bert_classifier(), dataset, accumulation)
    assert logged["task_loss"] == pytest.approx(reference["task_loss"], rel=1e-5)
    assert logged["loss"] == pytest.approx(reference["loss"], abs=2e-4)


def test_a_backward_in_eval_mode_warns_once_that_only_the_head_learns():
    model = tiny_mlp(num_areas=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(3, 5))  # inference without no_grad: no backward, no warning
        with torch.no_grad():
            model(torch.randn(3, 5))
    with pytest.warns(UserWarning, match="trains the head alone"):
        model(torch.randn(3, 5)).logits.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(3, 5)).logits.sum().backward()  # said once
        model.train()(torch.randn(3, 5)).logits.sum().backward()


def test_deep_copying_a_converted_model_is_refused_with_what_to_do_instead():
    import copy

    with pytest.raises(TypeError, match="cannot be deep-copied.*convert the copy"):
        copy.deepcopy(tiny_mlp(num_areas=2))

