"""Did each stage of ``rlhf pipeline`` learn? A run that learned nothing must not read as a normal result.

After every stage the pipeline checks the figure that says whether it learned, from what the
stage wrote (its ``DONE`` file):

- ``pretrain`` and ``sft``: the held-out loss (nats per token) against a unigram model's on the
  same tokens (``eval/unigram_loss``, token frequencies alone). No lower means the model learned
  nothing a frequency table does not know.
- ``preferences``: the share of prompts whose K answers the gold reward ties all together (such
  a prompt gives no ranking). Above :data:`MAX_TIED_SHARE`, the gold reward cannot tell most
  answers apart.
- ``rm``: held-out pairwise accuracy against chance, 0.5. With ``n`` held-out pairs the binomial
  standard error of an accuracy near chance is ``sqrt(0.25 / n)``; an accuracy less than
  :data:`Z` standard errors above 0.5 is within noise of chance.

A stage that fails its check is ``failed-to-learn``; a stage that depends on it (:data:`DEPENDS`,
transitively) still runs and is ``ran-against-failed``, naming the stages it ran against. Each
finding says the figure and what to change; the pipeline prints it when the stage ends, puts it
at the top of ``report.md`` and in ``summary.json`` (``stages``).
"""

from __future__ import annotations

import math
import sys

Z = 2.0
MAX_TIED_SHARE = 0.5
DEPENDS: dict[str, tuple[str, ...]] = {
    "pretrain": (), "sft": ("pretrain",), "preferences": ("sft",), "rm": ("preferences",),
    "ppo": ("sft", "rm"), "dpo": ("sft", "preferences"),
}
"""Which stages' output each stage trains on or from."""

OK, FAILED, RAN_AGAINST, NOT_RUN = "ok", "failed-to-learn", "ran-against-failed", "not-run"


def _loss_finding(stage: str, info: dict, fix: str) -> dict:
    loss, unigram = info.get("eval/loss"), info.get("eval/unigram_loss")
    if loss is None or unigram is None:
        return {"status": OK, "figure": "no held-out split: not checked"}
    figure = f"held-out loss {loss:.3f} nats/token, unigram model {unigram:.3f}"
    if loss < unigram:
        return {"status": OK, "figure": figure}
    return {"status": FAILED, "figure": figure, "message": f"{stage}: the held-out loss is no better than a unigram "
            f"model's ({figure}): the model learned nothing a table of token frequencies does not know", "fix": fix}


def check_pretrain(info: dict) -> dict:
    return _loss_finding("pretrain", info, "give more text, more steps (--pretrain-steps) or a larger --pretrain-size")


def check_sft(info: dict) -> dict:
    return _loss_finding("sft", info, "give more demonstrations or SFT epochs, a higher --sft-learning-rate, or a base "
                                      "model that knows this text (--corpus pretrains one on it)")


def check_preferences(info: dict) -> dict:
    prompts, kept = info["prompts"], info["rankings_kept"]
    tied = prompts - kept
    figure = f"the gold reward tied all K answers on {tied} of {prompts} prompts ({tied / max(prompts, 1):.0%})"
    if tied <= MAX_TIED_SHARE * prompts and kept >= 2:
        return {"status": OK, "figure": figure}
    return {"status": FAILED, "figure": figure,
            "message": f"preferences: {figure}, leaving {kept} rankings: the gold reward cannot tell most answers "
                       "apart",
            "fix": "use a gold reward that separates these answers (--gold-reward), longer answers (--max-new-tokens) "
                   "or more answers per prompt (--k-responses)"}


def check_rm(info: dict) -> dict:
    accuracy, pairs = info.get("eval/accuracy"), info.get("eval/pairs")
    if accuracy is None or not pairs:
        return {"status": OK, "figure": "no held-out rankings: not checked"}
    stderr = math.sqrt(0.25 / pairs)
    figure = f"held-out accuracy {accuracy:.3f} on {int(pairs)} pairs (chance 0.5, standard error {stderr:.3f})"
    if accuracy - 0.5 >= Z * stderr:
        return {"status": OK, "figure": figure}
    return {"status": FAILED, "figure": figure,
            "message": f"rm: {figure}: within {Z:g} standard errors of chance, the reward model ranks answers no "
                       "better than a coin",
            "fix": "give more preference prompts (--n-preference-prompts), more --rm-epochs or a higher "
                   "--rm-learning-rate, and check that the gold reward ranks the answers (preferences' ties)"}


CHECKS = {"pretrain": check_pretrain, "sft": check_sft, "preferences": check_preferences, "rm": check_rm}


def stage_status(stage: str, info: dict | None, statuses: dict[str, dict]) -> dict:
    """The finding of ``stage`` (``info``: its DONE content; None if it did not run), given the earlier ``statuses``."""
    if info is None:
        return {"status": NOT_RUN}
    finding = CHECKS[stage](info) if stage in CHECKS else {"status": OK}
    against = sorted({name for dep in DEPENDS[stage] if dep in statuses
                      for name in ([dep] if statuses[dep]["status"] == FAILED else statuses[dep].get("ran_against",
                                                                                                     []))})
    if against:
        finding["ran_against"] = against
        if finding["status"] == OK:
            finding["status"] = RAN_AGAINST
    return finding


def warnings_of(statuses: dict[str, dict]) -> list[str]:
    """One line per stage that did not learn or ran against one that did not: the figure and what to change."""
    lines = []
    for stage, s in statuses.items():
        if s["status"] == FAILED:
            lines.append(f"{s['message']}. To change: {s['fix']}.")
        elif s["status"] == RAN_AGAINST:
            lines.append(f"{stage}: ran against {', '.join(s['ran_against'])}, which did not learn: read its figures "
                         "as those of a run that learned nothing there.")
    return lines


def announce(stage: str, status: dict) -> None:
    """Print the finding of a stage that did not learn (or ran against one) on the console, when it ends."""
    for line in warnings_of({stage: status}):
        print(f"[pipeline] WARNING {line}", file=sys.stderr, flush=True)
