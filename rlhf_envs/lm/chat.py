"""Conversations (TRL's conversational format) rendered with the tokenizer's chat template.

A conversation is a list of ``{"role": str, "content": str}`` turns. Wherever a prompt is taken (the
envs, PPO, the trainers' data), it may be a plain string or a conversation; a response to a
conversation is an assistant turn (a string, or a list of turns in TRL's preference format).

Token conventions. Plain text is tokenised with the tokenizer's own special tokens (the embedded
tokenizer prepends its BOS), as it always was. A rendered conversation already holds the special
tokens its template writes (BOS, turn ends), so it is tokenised with ``add_special_tokens=False``:
no second BOS. A response's text is the rendered whole minus the rendered prompt with its
generation prompt (TRL's split), so it ends with the template's end-of-turn marker (EOS for the
embedded template) and nothing else is appended.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_conversation", "chat_reward_text", "encode_prompt", "is_conversation", "prompt_text",
           "prompt_and_response_text"]


def is_conversation(value: Any) -> bool:
    """Whether ``value`` is a list of turns (dicts), as opposed to a plain string."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(turn, dict) for turn in value)


def check_conversation(value: Any, what: str) -> list[dict[str, str]]:
    """``value`` if it is a non-empty list of ``{"role": str, "content": str}`` turns, else a ``ValueError``
    that names the turn."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a string or a non-empty list of {{'role', 'content'}} turns, "
                         f"got {value!r:.80}")
    for k, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"{what}[{k}] must be a {{'role', 'content'}} dict, got {type(turn).__name__}")
        for key in ("role", "content"):
            if key not in turn:
                raise ValueError(f"{what}[{k}] is missing field {key!r} (a turn needs 'role' and 'content')")
            if not isinstance(turn[key], str):
                raise ValueError(f"{what}[{k}].{key} must be a str, got {type(turn[key]).__name__}")
    return value


def _render(tokenizer: Any, turns: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template, which conversational data (lists of role/content "
            "turns) needs: set tokenizer.chat_template to a Jinja template and save the tokenizer, "
            "or give plain-text data")
    # keep only role and content: datasets folders and parquet files fill absent keys of a turn with None
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text a policy continues: a plain prompt itself, a conversation rendered with its generation prompt."""
    return _render(tokenizer, prompt, True) if is_conversation(prompt) else prompt


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a prompt (see the module's token conventions)."""
    if is_conversation(prompt):
        return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _assistant_turns(response: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return response if is_conversation(response) else [{"role": "assistant", "content": response}]


def prompt_and_response_text(tokenizer: Any, prompt: list[dict[str, str]], response: str | list[dict[str, str]]
                             ) -> tuple[str, str]:
    """``(prompt text, response text)`` of a conversation and its reply: the rendered prompt with its generation
    prompt, and the rest of the rendered whole (the reply and its end-of-turn marker)."""
    head = _render(tokenizer, prompt, True)
    whole = _render(tokenizer, list(prompt) + _assistant_turns(response), False)
    if not whole.startswith(head):
        raise ValueError(
            "the chat template renders a conversation with a reply so that it does not start with the same "
            "conversation "
            f"rendered with add_generation_prompt=True ({head[-40:]!r} vs {whole[len(head) - 40:len(head)]!r}); "
            "a prompt/response split needs a template whose generation prompt is the start of the assistant turn")
    return head, whole[len(head):]


def chat_reward_text(tokenizer: Any, prompt: list[dict[str, str]], response: str | list[dict[str, str]]) -> str:
    """The rendered conversation with its reply, as a reward model reads it (tokenise it without special tokens)."""
    return _render(tokenizer, list(prompt) + _assistant_turns(response), False)


EMBEDDED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}assistant: {{ message['content'] | trim }}{{ eos_token }}"
    "{% else %}{{ message['role'] }}: {{ message['content'] | trim }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The embedded tokenizer's chat template: ``role: content`` lines from tokens its vocabulary already has (no
retraining), each assistant turn ending with EOS, so a policy's reply ends where its responses always end.
An assistant turn's content is trimmed, so a sampled reply (``" great film"``, with the space its first token
carries) renders exactly as the generation prompt ``assistant:`` followed by the reply."""
