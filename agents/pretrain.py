"""Pretraining (``rlhf pretrain``): a causal LM learns a user's own plain text, next token by next token.

The recipe is the one that builds the embedded default (:mod:`rlhf_envs.lm.build_embedded`), as a
trainer of the project:

1. **Text.** Every file of ``corpus_paths`` (UTF-8 plain text) is cut into passages
   (:func:`rlhf_envs.lm.build_embedded.text_passages`: a block between blank lines, a speech or a
   paragraph; a longer block cut at line ends into pieces of at most ``max_chars`` characters).
   One passage is one training sequence, ``BOS + passage + EOS``, cut to ``max_length`` tokens.
   ``eval_fraction`` of the passages (seeded) are held out.
2. **Tokenizer.** A byte-level BPE of ``vocab_size`` tokens trained on the training passages
   (:func:`rlhf_envs.lm.build_embedded.train_tokenizer`, the ``tokenizers`` library), or the one
   in ``tokenizer_path``, or ``model_path``'s own.
3. **Model.** A new GPT-2 of a size preset (:data:`SIZES`), or the causal LM in ``model_path``
   (GPT-2, Llama family, ...) to go on pretraining. The build script knows GPT-2 alone, so a new
   model is a GPT-2; a Llama-family model is pretrained further from its directory.
4. **Training.** The shared loop of :mod:`agents.lm_common` (progress bar, checkpoints and exact
   resume with ``checkpoint_every``/``resume``, metrics JSONL) on the next-token loss of every
   token after BOS. Held out it logs ``eval/loss`` and ``eval/unigram_loss``: the same tokens under
   token frequencies alone, the baseline a model that learned anything beats.

The result is a Hugging Face directory (``output_dir``) with ``pretrain_info.json`` beside the
weights: passages, tokens, parameters, the held-out loss and the unigram baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agents.data import TokenizedSequences
from agents.distributed import is_main_process
from agents.lm_common import LMTrainConfig, TrainResult, held_out_split, start_run
from rlhf_envs.lm.build_embedded import new_gpt2, text_passages, train_tokenizer

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128},
    "small": {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128},
    "medium": {"n_layer": 6, "n_embd": 256, "n_head": 8, "n_positions": 256},
}
"""GPT-2 shapes by name. ``small`` is the embedded default's (0.9M parameters with 1,024 tokens:
600 steps of 64 passages take about 5 minutes on one CPU thread); ``tiny`` is for tests."""


@dataclass
class PretrainConfig(LMTrainConfig):
    """Hyper-parameters of :func:`train_pretrain`; the shared fields are documented on :class:`LMTrainConfig`."""

    corpus_paths: list = field(default_factory=list, metadata={"help": "plain-text (UTF-8) files to pretrain on"})
    data_path: str = field(default="", init=False, metadata={"help": "the corpus files, for the record (set from "
                                                                     "corpus_paths)"})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "the pretrained model and its tokenizer (a "
                                                                       "Hugging Face directory), metrics.jsonl and "
                                                                       "checkpoints/ go here"})
    model_path: str | None = field(default=None, metadata={"help": "an existing causal-LM directory to go on "
                                                                   "pretraining (its tokenizer is kept); None = a "
                                                                   "new GPT-2 of the size preset"})
    tokenizer_path: str | None = field(default=None, metadata={"help": "a tokenizer directory to keep; None = train a "
                                                                       "byte-level BPE on the corpus (or keep "
                                                                       "model_path's)"})
    size: str = field(default="small", metadata={"help": f"size preset of a new GPT-2: {', '.join(SIZES)}"})
    vocab_size: int = field(default=1024, metadata={"help": "BPE vocabulary of a new tokenizer, special tokens "
                                                            "included"})
    max_chars: int = field(default=400, metadata={"help": "longest passage in characters (blocks between blank lines, "
                                                          "longer ones cut at line ends)"})
    max_steps: int | None = field(default=600, metadata={"help": "optimizer steps (the LR schedule is sized to it); "
                                                                 "None = num_epochs full passes"})
    batch_size: int = field(default=64, metadata={"help": "passages per optimizer step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (the embedded build's)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps with a linear LR warm-up"})
    lr_schedule: str = field(default="cosine", metadata={"help": "LR decay after warm-up: linear, cosine or constant"})

    def __post_init__(self) -> None:
        if not self.corpus_paths or not isinstance(self.corpus_paths, (list, tuple)):
            raise ValueError(f"PretrainConfig.corpus_paths is {self.corpus_paths!r}: give a list of plain-text files")
        self.corpus_paths = [str(p) for p in self.corpus_paths]
        self.data_path = ", ".join(self.corpus_paths)
        super().__post_init__()
        if self.size not in SIZES:
            raise ValueError(f"PretrainConfig.size {self.size!r} is not a preset: choose one of {list(SIZES)}")
        if self.vocab_size < 260:
            raise ValueError(f"PretrainConfig.vocab_size={self.vocab_size}; need >= 260 (256 bytes, 2 special tokens, "
                             "merges)")
        if self.max_chars < 20:
            raise ValueError(f"PretrainConfig.max_chars={self.max_chars}; a passage needs >= 20 characters")
        if self.model_path is None and self.max_length > SIZES[self.size]["n_positions"]:
            raise ValueError(f"PretrainConfig.max_length={self.max_length} exceeds the {self.size!r} preset's context "
                             "of "
                             f"{SIZES[self.size]['n_positions']} tokens: lower max_length or pick a larger size")
        for name in ("model_path", "tokenizer_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise FileNotFoundError(f"PretrainConfig.{name} {value!r} is not a directory: give a Hugging Face "
                                        "directory, or None")
        n = len(corpus_passages(self.corpus_paths, self.max_chars))
        if self.eval_fraction > 0 and n < 2:
            raise ValueError(f"the corpus {self.corpus_paths} has {n} passage(s): a held-out loss needs >= 2 "
                             "(give more text, or eval_fraction=0)")


def read_corpus(paths: list[str]) -> list[str]:
    """The text of each file; raises ``ValueError`` naming the file for a missing, binary, non-UTF-8 or empty one."""
    texts = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {str(path)!r} does not exist: give plain-text (UTF-8) files")
        raw = path.read_bytes()
        nul = raw.find(b"\x00", 0, 1 << 20)
        if nul >= 0:
            raise ValueError(f"corpus file {str(path)!r} is binary (a NUL byte at offset {nul}): give plain text "
                             "(UTF-8)")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {str(path)!r} is not UTF-8 text (byte {err.start} of {len(raw)}): "
                             "convert it to UTF-8 plain text") from err
        if not text.strip():
            raise ValueError(f"corpus file {str(path)!r} is empty ({len(raw)} bytes, no text): give a file with text")
        texts.append(text)
    return texts


def corpus_passages(paths: list[str], max_chars: int = 400) -> list[str]:
    """Every passage of every file, in order (see the module docstring)."""
    return [p for text in read_corpus(paths) for p in text_passages(text, max_chars)]


def encode_passages(passages: list[str], tokenizer, max_length: int) -> TokenizedSequences:
    """``BOS + passage + EOS`` per passage, cut to ``max_length`` tokens (keeping the EOS); the BOS is the
    "prompt" (length 1), so every later token is a target. A tokenizer without BOS starts with its EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    rows, truncated = [], 0
    for ids in tokenizer(passages, add_special_tokens=False, verbose=False)["input_ids"]:
        row = [start, *ids][: max_length - 1] + [tokenizer.eos_token_id]
        truncated += len(ids) + 2 > max_length
        rows.append(torch.tensor(row, dtype=torch.long))
    return TokenizedSequences(rows, torch.ones(len(rows), dtype=torch.long), truncated)


def _tokenizer_and_model(config: PretrainConfig, train_texts: list[str]):
    """The tokenizer (kept or trained) and the model (loaded or new) of ``config``."""
    from rlhf_envs.lm.loading import load_causal_lm, load_tokenizer

    out = Path(config.output_dir)
    if config.model_path is not None:
        model, tokenizer = load_causal_lm(config.model_path, trust_remote_code=config.trust_remote_code)
        if config.tokenizer_path is not None:
            tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {config.model_path!r} embeds "
                             f"{model.get_input_embeddings().num_embeddings}: keep the model's own tokenizer")
        return tokenizer, model.train()
    if config.tokenizer_path is not None:
        tokenizer = load_tokenizer(config.tokenizer_path, trust_remote_code=config.trust_remote_code)
    elif config.resume and (out / "tokenizer.json").is_file():  # the one this run trained before it stopped
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = train_tokenizer(train_texts, config.vocab_size)
    tokenizer.model_max_length = SIZES[config.size]["n_positions"]
    if is_main_process():  # before training: a resumed run keeps this vocabulary
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out)
    return tokenizer, new_gpt2(tokenizer, **SIZES[config.size])


def train_pretrain(config: PretrainConfig) -> TrainResult:
    """Pretrain on ``config.corpus_paths``; the model and its tokenizer are saved in ``config.output_dir``."""
    from agents.sft import fit_sequences

    device = start_run(config)
    passages = corpus_passages(config.corpus_paths, config.max_chars)
    train_idx, eval_idx = held_out_split(len(passages), config.eval_fraction, config.seed)
    tokenizer, model = _tokenizer_and_model(config, [passages[i] for i in train_idx])
    data = encode_passages(passages, tokenizer, config.max_length)
    result = fit_sequences(config, "pretrain", model, tokenizer, data, train_idx, eval_idx, device)
    info = {"passages": len(passages), "train_passages": len(train_idx), "eval_passages": len(eval_idx),
            "tokens": int(sum(len(x) for x in data.input_ids)), "truncated_passages": data.num_truncated,
            "vocab_size": len(tokenizer), "n_parameters": sum(p.numel() for p in model.parameters()),
            "model": config.model_path or f"new GPT-2 ({config.size}: {SIZES[config.size]})",
            "eval_loss": result.metrics.get("eval/loss"), "eval_unigram_loss": result.metrics.get("eval/unigram_loss"),
            "steps": result.global_step, "train_seconds": round(result.train_seconds, 1)}
    if is_main_process():
        (Path(config.output_dir) / "pretrain_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return result
