"""Fast unit tests: JSONL validation, auto hyperparameters, ids, atomic adapter dirs."""
import json

import pytest

from parallm.engine.errors import InvalidRequest
from parallm.finetune.adapter_files import is_complete_adapter_dir, remove_temporaries, write_adapter_dir
from parallm.finetune.hyperparams import parse_method, resolve_plan
from parallm.finetune.ids import is_valid_id, new_id, require_path_safe
from parallm.finetune.validation import MAX_REPORTED_ERRORS, validate_jsonl_lines


def lines(*rows):
    return [(r if isinstance(r, str) else json.dumps(r)).encode() + b"\n" for r in rows]


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_each_format_is_accepted():
    assert validate_jsonl_lines(lines(CHAT, CHAT)).format == "chat"
    assert validate_jsonl_lines(lines({"prompt": "a", "completion": "b"})).format == "completion"
    report = validate_jsonl_lines(lines({"text": "a"}, "", {"text": "b"}))
    assert report.ok and report.rows == 2 and report.format == "text"


def test_errors_name_line_numbers():
    report = validate_jsonl_lines(lines(CHAT, "{not json", {"messages": [{"role": "wizard", "content": "x"}]},
                                        {"messages": [{"role": "user", "content": "only a question"}]},
                                        {"text": "other format"}, [1, 2], {"foo": 1}))
    assert not report.ok
    got = {e.line: e.message for e in report.errors}
    assert set(got) == {2, 3, 4, 5, 6, 7}
    assert "invalid JSON" in got[2]
    assert "wizard" in got[3] and "accepted roles" in got[3]
    assert "assistant" in got[4]
    assert "text format" in got[5] and "chat format" in got[5]
    assert "JSON object" in got[6]
    assert "unknown row format" in got[7]


def test_error_list_is_capped_but_counted():
    report = validate_jsonl_lines(lines(*(["{bad"] * (MAX_REPORTED_ERRORS + 5))))
    assert len(report.errors) == MAX_REPORTED_ERRORS and report.total_errors == MAX_REPORTED_ERRORS + 5


def test_empty_file_is_an_error():
    assert not validate_jsonl_lines([b"\n"]).ok


def test_auto_plan_for_the_measured_case():
    plan = resolve_plan(parse_method(None, None), train_rows=24, model_layers=30)
    assert (plan.batch_size, plan.iters, plan.learning_rate, plan.num_layers, plan.method) == (4, 30, 2e-4, 8, "lora")


def test_auto_plan_small_and_explicit():
    plan = resolve_plan(parse_method(None, None), train_rows=3, model_layers=2)
    assert plan.batch_size == 3 and plan.num_layers == 2 and plan.iters >= 1
    explicit = resolve_plan(parse_method({"type": "dora"}, {"n_epochs": 2, "batch_size": 2,
                                                             "learning_rate_multiplier": 0.5}), train_rows=10, model_layers=None)
    assert (explicit.method, explicit.iters, explicit.learning_rate) == ("dora", 10, 1e-4)


def test_openai_supervised_method_shape():
    m = parse_method({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}, None)
    assert m.type == "lora" and m.hyperparameters.n_epochs == 3


@pytest.mark.parametrize("method,hyper", [({"type": "qlora2"}, None), (None, {"n_epochs": 0}),
                                          (None, {"batch_size": "big"}), (None, {"warmup": 3})])
def test_bad_method_or_hyperparameters(method, hyper):
    with pytest.raises(InvalidRequest):
        resolve_plan(parse_method(method, hyper), train_rows=8, model_layers=None)


def test_batch_larger_than_dataset_is_rejected():
    with pytest.raises(InvalidRequest, match="batch_size"):
        resolve_plan(parse_method(None, {"batch_size": 9}), train_rows=8, model_layers=None)


def test_ids_are_path_safe():
    assert is_valid_id(new_id("file"), "file")
    for bad in ("../../etc/passwd", "file-../x", "file-" + "a" * 23 + "/", "ftjob-" + "a" * 24):
        with pytest.raises(ValueError):
            require_path_safe(bad, "file")


def test_adapter_dir_write_replaces_whole_and_cleans_temporaries(tmp_path):
    import mlx.core as mx

    final = tmp_path / "a" / "step-1"
    write_adapter_dir(final, {"w": mx.zeros((2,))}, {"v": 1})
    write_adapter_dir(final, {"w": mx.ones((2,))}, {"v": 2})
    assert is_complete_adapter_dir(final)
    assert json.loads((final / "adapter_config.json").read_text()) == {"v": 2}
    assert mx.load(str(final / "adapters.safetensors"))["w"].tolist() == [1.0, 1.0]
    (final.parent / ".tmp-step-2-123").mkdir()  # what a writer killed mid-write leaves
    assert not is_complete_adapter_dir(final.parent / ".tmp-step-2-123")
    remove_temporaries(final.parent)
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-1"]
