"""Environments: deterministic tasks, disjoint splits, verifiable scores, tools, warm-start data."""
import collections
import re

import pytest

from k2jax import chat, envs
from k2jax.envs import base
from k2jax.infer import heavy
from k2jax.infer.agent import run_agent
from k2jax.tokenizer_build import tiny_tokenizer
from k2jax.train import data


def test_registry_and_errors():
  assert set(envs.names()) >= {"arith", "lookup"}
  with pytest.raises(ValueError, match="unknown environment 'nope'; known: arith, lookup"):
    envs.get("nope")
  with pytest.raises(ValueError, match="bad options for environment 'arith'"):
    envs.get("arith", colour=3)
  with pytest.raises(ValueError, match="digits must lie"):
    envs.get("arith", digits=0)


def test_splits_are_disjoint():
  train, held = base.task_seeds("train", 500), base.task_seeds("eval", 500)
  assert not set(train) & set(held)
  with pytest.raises(ValueError, match="split"):
    base.task_seeds("test", 3)


@pytest.mark.parametrize("name", ["arith", "lookup"])
def test_tasks_deterministic_and_varied(name):
  env = envs.get(name)
  a, b = env.reset(17), env.reset(17)
  assert a == b
  answers = {env.reset(s).answer for s in range(50)}
  assert len(answers) > 30


def test_extract_digits_hostile_text():
  assert base.extract_digits("9 3 6") == "936"
  assert base.extract_digits(" 1 0 4 7.") == "1047"
  assert base.extract_digits("936") == "936"
  for bad in ["", "nine", "9 3 x", "12 34", "__import__('os')", "٣", None, "9" * 5000 + " x"]:
    assert base.extract_digits(bad) is None


def test_arith_trace_computes_the_sum():
  env = envs.get("arith", digits=4)
  for seed in range(30):
    task = env.reset(seed)
    a, b = (int(x.replace(" ", "")) for x in re.findall(r"\d(?: \d)*", task.messages[-1]["content"]))
    assert str(a + b) == task.answer
    # The trace's column results, last digits read right to left plus the final carry, are the answer.
    sums = [int(step.split("=")[1]) for step in env.trace(seed).split()]
    digits = "".join(str(s % 10) for s in sums)[::-1]
    assert (str(sums[-1] // 10) if sums[-1] >= 10 else "") + digits == task.answer


@pytest.mark.parametrize("name", ["arith", "lookup"])
def test_score_and_format(name):
  env = envs.get(name)
  task = env.reset(5)
  right, _ = env.score(task, base.spaced(task.answer))
  wrong, info = env.score(task, base.spaced(int(task.answer) + 1))
  none, info_none = env.score(task, "I do not know")
  assert right == 1.0 and info["correct"] is False and 0 < wrong < right
  assert info["expected"] == task.answer and info_none["answer"] is None and none < right


def test_lookup_needs_the_tool_and_scores_a_trajectory():
  env = envs.get("lookup")
  task = env.reset(3)
  tool = env.tool_fns(task)["lookup"]
  table, item = env.table(3)
  assert tool({"key": item}).replace(" ", "") == task.answer
  # A scripted policy that calls the tool then copies its output gets full reward.
  replies = iter([f'<think>look</think><|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0'
                  f'<|tool_call_argument_begin|>{{"key": "{item}"}}<|tool_call_end|><|tool_calls_section_end|>',
                  f"<think></think>{base.spaced(task.answer)}"])
  traj = run_agent(lambda p: next(replies), task.messages, [tool], 4, 10_000, len)
  reward, info = env.score(task, traj)
  assert reward == 1.0 and info["tool_calls"] == 1
  # A malformed call costs format reward even when the answer is right.
  replies = iter(["<|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0<|tool_call_argument_begin|>{bad",
                  f"<think></think>{base.spaced(task.answer)}"])
  traj = run_agent(lambda p: next(replies), task.messages, [tool], 4, 10_000, len)
  reward, info = env.score(task, traj)
  assert info["correct"] and reward < 1.0


@pytest.mark.parametrize("name", ["arith", "lookup"])
def test_sft_examples_render_and_answer_right(name):
  env = envs.get(name, aggregate_frac=0.25)
  tok = tiny_tokenizer()
  examples = env.sft_examples(100, 16)
  assert len(examples) == 16
  n_agg = 0
  for conv in examples:
    task = env.reset(100)  # any task: only the tools declaration is needed
    ids, w = data.chat_document(tok, conv, task.tools or None)
    assert w.sum() > 0
    final = conv[-1]
    assert final["role"] == "assistant" and env.extract_answer(final["content"]) is not None
    n_agg += "independent attempts" in conv[-2]["content"]
  assert n_agg == 4
  # Non-aggregation examples answer their own task correctly.
  env = envs.get(name)
  tasks = [env.reset(200 + j) for j in range(8)]
  for conv in env.sft_examples(200, 8):
    same = [t for t in tasks if t.messages == conv[:2]]
    assert any(env.score(t, conv[-1]["content"])[1]["correct"] for t in same)


def test_aggregation_target_is_the_majority():
  env = envs.get("arith")
  sizes = set()
  for conv in base.aggregation_examples(env, 0, 40):
    listed = re.findall(r"### Attempt \d+ \(0 tool calls\)\n([\d ]+)", conv[-2]["content"])
    top = collections.Counter(listed).most_common()
    assert top[0][0] == conv[-1]["content"] and (len(top) == 1 or top[1][1] < top[0][1])  # strict plurality
    sizes.add(len(listed))
    assert chat.render(conv)  # renders
  assert sizes == {1, 2, 4, 8}


def test_compact_aggregation_examples_target_the_plurality_right_or_wrong():
  env = envs.get("arith", digits=2)
  tok = tiny_tokenizer()
  convs = base.aggregation_examples(env, 0, 200, tuple(range(1, 9)), prompt=heavy.COMPACT, right_frac=0.5)
  n_right, sizes = 0, set()
  for i, conv in enumerate(convs):
    lines = conv[-2]["content"].split("\n")
    assert lines[0] == f"{len(lines) - 2} answers:" and lines[-1] == "Most common answer:"
    listed = lines[1:-1]
    top = collections.Counter(listed).most_common()
    assert top[0][0] == conv[-1]["content"] and (len(top) == 1 or top[1][1] < top[0][1])  # strict plurality
    n_right += env.extract_answer(conv[-1]["content"]) == env.reset(i).answer
    sizes.add(len(listed))
    ids, w = data.chat_document(tok, conv)
    assert len(ids) < 160 and w.sum() > 0  # eight attempts fit a short training row
  assert sizes == set(range(1, 9))
  assert 70 <= n_right <= 130  # the target is the plurality, not the task's answer: about half are right
