"""Build the embedded default model: a byte-level BPE tokenizer and a small GPT-2 (or its Llama twin).

Run ``python -m rlhf_envs.lm.build_embedded`` to regenerate ``rlhf_envs/assets/embedded``
from scratch (nothing is downloaded); ``--arch llama`` builds ``rlhf_envs/assets/embedded-llama``,
a Llama-architecture model (RMSNorm, rotary positions, grouped-query attention, SwiGLU) of about the
same size on the same corpus, with the same tokenizer (the BPE training is deterministic); the committed
twin was built with ``--arch llama --max-steps 2400``. The corpus is the project's own synthetic
reviews (:mod:`rlhf_envs.corpus`), or, with ``--corpus shakespeare --data PATH``,
short passages of a plain-text file such as tinyshakespeare.

Every training text is ``<|endoftext|> + text + <|endoftext|>``: the tokenizer's
post-processor prepends ``<|endoftext|>`` as BOS to whatever it encodes (prompts
included), and the build appends it as EOS so the model learns to stop.

The same seed gives the same ``config.json``, ``model.safetensors`` and tokenizer
files on the same machine; ``build_info.json`` also records the wall time, which
differs between runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from rlhf_envs.corpus import make_reviews
from rlhf_envs.lm.chat import EMBEDDED_CHAT_TEMPLATE
from rlhf_envs.validation import check_config_fields

BOS_EOS = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "embedded"
ARCH_OUT = {"gpt2": DEFAULT_OUT, "llama": DEFAULT_OUT.with_name("embedded-llama")}


@dataclass
class BuildConfig:
    """Everything that determines the embedded tokenizer and model."""

    out: Path | None = field(
        default=None,
        metadata={
            "help": "output directory (replaced atomically); default "
            "rlhf_envs/assets/embedded, or embedded-llama with --arch llama"
        },
    )
    arch: str = field(default="gpt2", metadata={"help": "'gpt2' (the default model) or 'llama' (its Llama twin)"})
    seed: int = field(default=0, metadata={"help": "seed for the corpus, the init and the batch order"})
    corpus: str = field(default="reviews", metadata={"help": "'reviews' (synthetic) or 'shakespeare'"})
    data: Path | None = field(default=None, metadata={"help": "plain-text file for --corpus shakespeare"})
    n_texts: int = field(default=100_000, metadata={"help": "number of synthetic reviews to train on"})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary size, special tokens included"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=128, metadata={"help": "hidden width"})
    n_head: int = field(default=4, metadata={"help": "attention heads (must divide n_embd)"})
    n_kv_head: int = field(
        default=2, metadata={"help": "llama only: key/value heads (grouped-query attention; must divide n_head)"}
    )
    intermediate_size: int = field(
        default=384, metadata={"help": "llama only: SwiGLU width (the twin then has about the GPT-2's parameter count)"}
    )
    n_positions: int = field(default=128, metadata={"help": "context length in tokens"})
    batch_size: int = field(default=64, metadata={"help": "texts per optimizer step"})
    max_steps: int = field(default=3000, metadata={"help": "optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps before the cosine decay"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads: 1 is robust on a shared machine, 2 is ~1.6x faster on an idle 2-core one"
        },
    )
    progress: bool = field(default=True, metadata={"help": "show a tqdm progress bar"})

    def __post_init__(self) -> None:
        check_config_fields(self)
        if self.arch not in ARCH_OUT:
            raise ValueError(f"arch={self.arch!r}; expected one of {sorted(ARCH_OUT)}.")
        self.out = Path(self.out) if self.out is not None else ARCH_OUT[self.arch]
        if self.arch == "llama" and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}; pick a divisor.")
        if self.corpus not in ("reviews", "shakespeare"):
            raise ValueError(f"corpus={self.corpus!r}; expected 'reviews' or 'shakespeare'.")
        if self.corpus == "shakespeare":
            if self.data is None or not Path(self.data).is_file():
                raise ValueError(
                    f"data={self.data!r} is not a file; --corpus shakespeare needs "
                    "--data PATH, e.g. ../shared/data/tinyshakespeare.txt."
                )
            self.data = Path(self.data)
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}; "
                "pick n_head among the divisors of n_embd."
            )
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size={self.vocab_size}; need >= 260 (256 bytes + 2 specials + merges).")
        for name in ("n_texts", "n_layer", "n_positions", "batch_size", "max_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer.")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}; expected 0 <= warmup_steps < max_steps={self.max_steps}."
            )


def text_passages(text: str, max_chars: int = 400) -> list[str]:
    """Split plain text into passages of at most ``max_chars`` characters (a single longer word excepted).

    A passage is a block between blank lines (a speech, a paragraph); a longer block is cut at
    line ends, and a line longer than ``max_chars`` at spaces. Lines keep their text, stripped of
    trailing whitespace; empty blocks are dropped.
    """
    passages: list[str] = []
    for block in re.split(r"\n[ \t\r]*\n", text):
        chunk: list[str] = []
        for line in _short_lines(block.strip().splitlines(), max_chars):
            if chunk and sum(len(x) + 1 for x in chunk) + len(line) > max_chars:
                passages.append("\n".join(chunk))
                chunk = []
            chunk.append(line)
        if chunk:
            passages.append("\n".join(chunk))
    return passages


def _short_lines(lines: list[str], max_chars: int) -> list[str]:
    """``lines`` stripped on the right, each longer than ``max_chars`` cut at spaces."""
    out: list[str] = []
    for line in (x.rstrip() for x in lines):
        while len(line) > max_chars and " " in line[1 : max_chars + 1]:
            cut = line.rindex(" ", 1, max_chars + 1)
            out.append(line[:cut])
            line = line[cut + 1 :]
        out.append(line)
    return out


def shakespeare_passages(path: Path, max_chars: int = 400) -> list[str]:
    """Split a play text into passages: one speech each, long speeches cut at line ends."""
    return text_passages(path.read_text(encoding="utf-8"), max_chars)


def load_texts(config: BuildConfig) -> list[str]:
    """The training texts, without special tokens."""
    if config.corpus == "reviews":
        return make_reviews(config.n_texts, config.seed)
    return shakespeare_passages(config.data)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|endoftext|>`` (id 0, BOS/EOS) and ``<|pad|>`` (id 1), left padding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A $B", special_tokens=[(BOS_EOS, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_EOS, eos_token=BOS_EOS, pad_token=PAD, padding_side="left"
    )


def encode(texts: list[str], tokenizer: PreTrainedTokenizerFast, max_len: int) -> list[list[int]]:
    """Token ids of ``BOS + text + EOS`` per text, cut to ``max_len`` (keeping the EOS)."""
    ids = tokenizer(texts)["input_ids"]
    return [row[: max_len - 1] + [tokenizer.eos_token_id] for row in ids]


def collate(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of shape (batch, longest row)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of index batches, each of similar lengths (less padding), in random order.

    Shuffles, sorts windows of 50 batches by length, cuts them into batches and shuffles
    the batches; a last partial batch is dropped.
    """
    order = rng.permutation(len(lengths))
    window = 50 * batch_size
    lengths_arr = np.asarray(lengths)
    batches = []
    for w in range(0, len(order) - batch_size + 1, window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths_arr[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_at(step: int, config: BuildConfig) -> float:
    """Linear warm-up to ``lr`` then cosine decay to ``lr / 10`` at ``max_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def new_gpt2(
    tokenizer: PreTrainedTokenizerFast, n_positions: int, n_embd: int, n_layer: int, n_head: int
) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (torch's global seed) sized for ``tokenizer``, dropout off."""
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def new_model(tokenizer: PreTrainedTokenizerFast, config: BuildConfig) -> PreTrainedModel:
    """A freshly initialised GPT-2 or Llama (``config.arch``), tied embeddings, no dropout."""
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if config.arch == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=config.n_positions,
                hidden_size=config.n_embd,
                intermediate_size=config.intermediate_size,
                num_hidden_layers=config.n_layer,
                num_attention_heads=config.n_head,
                num_key_value_heads=config.n_kv_head,
                tie_word_embeddings=True,
                attention_dropout=0.0,
                **special,
            )
        )
    return new_gpt2(tokenizer, config.n_positions, config.n_embd, config.n_layer, config.n_head)


def train_model(
    rows: list[list[int]], tokenizer: PreTrainedTokenizerFast, config: BuildConfig
) -> tuple[PreTrainedModel, dict]:
    """Train a GPT-2 or Llama on ``rows`` with AdamW; returns the model and training statistics."""
    torch.manual_seed(config.seed)
    model = new_model(tokenizer, config)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(config.seed)
    batches: list[np.ndarray] = []
    tokens_seen, losses = 0, []
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.max_steps), desc="training", disable=not config.progress)
    for step in bar:
        if not batches:
            batches = length_bucketed_batches([len(r) for r in rows], config.batch_size, rng)
        batch = collate([rows[i] for i in batches.pop()], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        tokens_seen += int(batch["attention_mask"].sum())
        losses.append(loss.item())
        if step % 20 == 0:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
    train_seconds = time.perf_counter() - start
    model.eval()
    stats = {
        "steps": config.max_steps,
        "tokens_seen": tokens_seen,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "train_seconds": round(train_seconds, 1),
        "tokens_per_second": round(tokens_seen / train_seconds),
    }
    return model, stats


@torch.no_grad()
def eval_loss(model: PreTrainedModel, rows: list[list[int]], pad_id: int, batch_size: int = 256) -> float:
    """Mean next-token cross-entropy (nats per token) over ``rows``."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], pad_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * n
        count += n
    return total / count


def build(config: BuildConfig) -> dict:
    """Train tokenizer and model per ``config`` and write them to ``config.out``; returns build info."""
    start = time.perf_counter()
    was_deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(config.threads)
    try:
        texts = load_texts(config)
        n_eval = min(1000, len(texts) // 20)
        train_texts, eval_texts = texts[n_eval:], texts[:n_eval]
        tokenizer = train_tokenizer(train_texts, config.vocab_size)
        tokenizer.model_max_length = config.n_positions
        tokenizer.chat_template = EMBEDDED_CHAT_TEMPLATE
        model, stats = train_model(encode(train_texts, tokenizer, config.n_positions), tokenizer, config)
        eval_rows = encode(eval_texts, tokenizer, config.n_positions)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)
    settings = {
        k: (v.name if isinstance(v, Path) else v)
        for k, v in dataclasses.asdict(config).items()
        if k not in ("out", "progress")
    }
    info = {
        "seed": config.seed,
        "corpus": config.corpus,
        "n_texts": len(train_texts),
        **stats,
        "eval_loss": round(eval_loss(model, eval_rows, tokenizer.pad_token_id), 4),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "config": settings,
        "torch_version": torch.__version__,
    }
    write_atomically(config.out, model, tokenizer, info, start)
    return info


def write_atomically(
    out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, info: dict, start: float
) -> None:
    """Save into a temporary sibling directory, then swap it in place of ``out``."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # the chat template inline in tokenizer_config.json
        info["wall_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> BuildConfig:
    """Command-line flags, one per :class:`BuildConfig` field (``--max-steps`` for ``max_steps``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(BuildConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), Path)
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return BuildConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m rlhf_envs.lm.build_embedded``."""
    config = parse_args(argv)
    info = build(config)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    print(f"wrote {config.out}")


if __name__ == "__main__":
    main()
