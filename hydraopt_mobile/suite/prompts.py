"""Prompts in the model's own chat template, and the training sequences built from them."""

from __future__ import annotations

from hydraopt_mobile.errors import UserError
from hydraopt_mobile.suite.tasks import TASK_NAMES, Example, TaskSpec, load_suite


def render_prompt(tokenizer, task: TaskSpec, example: Example) -> str:
    """The chat-formatted prompt (with the assistant turn opened) for one example.

    The task instruction is the system message (it replaces the template's default system prompt,
    which would cost ~20 tokens per example in training and decoding); the example is the user turn.
    """
    messages = [{"role": "system", "content": task.instruction}, {"role": "user", "content": example.prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def training_ids(tokenizer, task: TaskSpec, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example: the loss falls only on the answer and its end token.

    The answer is closed with the tokenizer's end-of-turn token (``<|im_end|>``), which is what
    generation stops on, so the adapter learns to stop as well as what to say.
    """
    prompt_ids = tokenizer(render_prompt(tokenizer, task, example), add_special_tokens=False).input_ids
    answer_ids = tokenizer(example.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def suite_instructions(tasks: list[str]) -> dict[str, str]:
    """Each suite task's instruction, the system message its adapter was trained with."""
    if unknown := [t for t in tasks if t not in TASK_NAMES]:
        raise UserError(f"--suite-instructions: {', '.join(map(repr, unknown))} not suite tasks (suite: {', '.join(TASK_NAMES)})")
    return {t.name: t.instruction for t in load_suite(tasks)}
