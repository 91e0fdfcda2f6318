"""Real models and real data: SmolLM2 offline, layer-subset students, tokenizer checks, data formats (issue 4)."""

import json

import pytest
import torch

from conftest import SHARED_DATA
from csd_ray.config import DataConfig, ModelConfig
from csd_ray.data import DataError, PromptStream, load_prompts, read_examples
from csd_ray.models import (
    ModelLoadError,
    check_same_tokenizer,
    layer_subset,
    load_model,
    load_tokenizer,
    model_folder,
    resolve,
)

SMOL = ModelConfig(path="smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOL)


def test_smollm2_teacher_loads_offline_and_answers_a_simple_question(tokenizer):
    model = load_model(SMOL, tokenizer)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_layer_subset_spreads_evenly_and_keeps_first_and_last():
    assert layer_subset(30, ModelConfig(num_layers=8)) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert layer_subset(30, ModelConfig(keep_layers=[29, 0, 3])) == [0, 3, 29]
    assert layer_subset(30, ModelConfig()) is None
    with pytest.raises(ModelLoadError, match=r"keep_layers \[31\] out of range: .* has 30 layers"):
        layer_subset(30, ModelConfig(keep_layers=[0, 31]))


def test_student_from_teacher_layers_round_trips_with_identical_logits(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(path="smollm2-135m-instruct", keep_layers=[0, 14, 29])
    student = load_model(cfg, tokenizer)
    teacher = load_model(SMOL, tokenizer)
    assert student.config.num_hidden_layers == 3
    # Its layers are the teacher's layers 0, 14 and 29, and it caches keys by its own indices.
    for mine, theirs in zip(student.model.layers, [teacher.model.layers[i] for i in (0, 14, 29)]):
        assert torch.equal(mine.mlp.down_proj.weight, theirs.mlp.down_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    student.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    ids = torch.tensor([[1, 200, 3000, 40, 5]])
    with torch.no_grad():
        assert torch.equal(student(ids).logits, reloaded(ids).logits)
        # generation with the KV cache works on the renumbered layers
        gen = reloaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert gen.shape == (1, 10)
    assert model_folder(cfg, tokenizer).endswith("layers-0-14-29")


def test_tokenizer_mismatch_is_refused_with_a_clear_message(tokenizer, tmp_path):
    other = load_tokenizer(SMOL)
    other.add_tokens(["<extra_a>", "<extra_b>"])
    with pytest.raises(ModelLoadError, match=r"tokenizer mismatch: .* 49152 tokens, teacher 't' has 49154 .* 2 only in the teacher"):
        check_same_tokenizer(tokenizer, other, "s", "t")
    templated = load_tokenizer(SMOL)
    templated.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ModelLoadError, match="chat template mismatch"):
        check_same_tokenizer(tokenizer, templated, "s", "t")
    check_same_tokenizer(tokenizer, load_tokenizer(SMOL), "s", "t")


def test_missing_model_paths_and_offline_hub_ids_fail_clearly(monkeypatch, tmp_path):
    with pytest.raises(ModelLoadError, match="model path not found: ./no/such/model"):
        resolve("./no/such/model")
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not an HF model folder"):
        resolve(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load 'someorg/no-such-model'.*offline"):
        load_model(ModelConfig(path="someorg/no-such-model"))


def _rows():
    return [{"question": f"What is {i} + 1?", "reply": f"{i + 1}", "answer": f"work #### {i + 1}"} for i in range(6)]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_each_data_format_loads(tokenizer, tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n")
    elif fmt == "json":
        path.write_text(json.dumps({"data": _rows()}))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(_rows()), path)
    cfg = DataConfig(source=str(path), response_field="reply", answer_field="answer", eval_size=2)
    prompts = load_prompts(cfg, tokenizer)
    assert len(prompts.train) == 4 and len(prompts.eval) == 2
    ex = prompts.train[0]
    assert ex.prompt_text.startswith("<|im_start|>") and "What is" in ex.prompt_text  # chat template applied
    assert ex.response_ids[-1] == tokenizer.eos_token_id
    assert ex.answer == str(int(ex.prompt_text.split("What is ")[1].split(" ")[0]) + 1)


def test_chat_messages_prompts(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": "Hi"}]}) + "\n")
    (ex,) = read_examples(DataConfig(source=str(path), prompt_field="messages"))
    prompts = load_prompts(DataConfig(source=str(path), prompt_field="messages", eval_size=0), tokenizer)
    assert isinstance(ex.prompt, list) and "Be terse." in prompts.train[0].prompt_text


def test_gsm8k_from_shared_data(tokenizer):
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/gsm8k is not beside this checkout")
    cfg = DataConfig(source=str(path), answer_field="answer", eval_size=4, max_prompt_tokens=512)
    prompts = load_prompts(cfg, tokenizer)
    assert len(prompts.train) + len(prompts.eval) + prompts.dropped_too_long == sum(1 for _ in open(path))
    assert all(e.answer.lstrip("-").isdigit() for e in prompts.eval)


def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a"}\n{"question": "b"}\n{"question": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON line"):
        read_examples(DataConfig(source=str(path)))


@pytest.mark.parametrize(
    "content, cfg, message",
    [
        ("", {}, "the dataset is empty"),
        ('{"prompt": "x"}\n', {}, r"no field 'question' \(data.prompt_field\); fields: prompt"),
        ('{"question": "x"}\n', {"response_field": "reply"}, "no field 'reply'"),
        ('[1, 2]\n', {}, "expected a JSON object, got list"),
    ],
)
def test_bad_data_files_fail_clearly(tmp_path, content, cfg, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_examples(DataConfig(source=str(path), **cfg))


def test_all_prompts_too_long_fails_and_some_too_long_are_counted(tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps({"question": "word " * n}) for n in (5, 300, 400)) + "\n")
    prompts = load_prompts(DataConfig(source=str(path), max_prompt_tokens=64, eval_size=0), tokenizer)
    assert len(prompts.train) == 1 and prompts.dropped_too_long == 2
    with pytest.raises(DataError, match="all 3 prompts are longer than data.max_prompt_tokens=8"):
        load_prompts(DataConfig(source=str(path), max_prompt_tokens=8), tokenizer)


def test_missing_file_unknown_type_and_offline_hub_dataset(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data file not found"):
        read_examples(DataConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported data file type '.csv'"):
        read_examples(DataConfig(source=str(tmp_path / "x.csv")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load hub dataset 'someorg/nothing'.*local"):
        read_examples(DataConfig(source="someorg/nothing"))


def test_prompt_stream_is_deterministic_and_resumable():
    items = list(range(10))
    a, b = PromptStream(items, seed=3), PromptStream(items, seed=3)
    first = a.next_batch(7)
    assert first == b.next_batch(7) and len(set(first)) == 7
    state = a.state()
    rest = a.next_batch(9)  # crosses an epoch boundary
    c = PromptStream(items, seed=3)
    c.load_state(state)
    assert c.next_batch(9) == rest
    assert sorted(first + rest[:3]) == items


# ---- the families' prompt and response conventions (issue 11) -------------------------------

def test_a_trailing_assistant_turn_is_the_reference_response_not_prompt_text(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "2 + 2 = 4."}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    cfg = DataConfig(source=str(path), prompt_field="messages", eval_size=0)
    (ex,) = load_prompts(cfg, tokenizer, end_id=tokenizer.eos_token_id).train
    assert "2 + 2 = 4." not in ex.prompt_text and ex.prompt_text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ex.response_ids) == "2 + 2 = 4." + tokenizer.eos_token


@pytest.mark.parametrize("family, bos_count", [("llama3", 1), ("gemma2", 1), ("qwen2", 0)])
def test_bos_is_added_exactly_as_the_tokenizer_adds_it(family_folder, family, bos_count):
    from csd_ray.data import encode_prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_folder(family))
    for chat_template in (True, False):
        ids, text = encode_prompt("What is 2 + 2?", tok, chat_template)
        if bos_count:
            assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (chat_template, ids[:4])
            assert text.startswith(tok.bos_token) == chat_template  # the template writes it; plain text does not
        elif not chat_template:  # a tokenizer that adds nothing gets nothing added
            assert ids == tok("What is 2 + 2?", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family, end_token", [("llama3", "<|eot_id|>"), ("gemma2", "<end_of_turn>"), ("qwen2", "<|im_end|>")])
def test_reference_responses_end_with_the_id_that_closes_an_assistant_turn(family_folder, tmp_path, family, end_token):
    from transformers import AutoTokenizer

    from csd_ray.generation import token_rules

    folder = family_folder(family)
    tok = AutoTokenizer.from_pretrained(folder)
    rules = token_rules(tok, str(folder))
    assert rules.end_of_response_id == tok.convert_tokens_to_ids(end_token) and end_token in tok.convert_ids_to_tokens(list(rules.stop_ids))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q?", "reply": "a."}) + "\n")
    cfg = DataConfig(source=str(path), response_field="reply", eval_size=0)
    (ex,) = load_prompts(cfg, tok, end_id=rules.end_of_response_id).train
    assert ex.response_ids[-1] == rules.end_of_response_id
