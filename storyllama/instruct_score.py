"""An automatic score of story requests: does the story use the words, and have the features, it was asked for?

    bin/instruct_score --run runs/demo-instruct [--run runs/demo ...] [--requests 200] [--seed 4242]

For a fixed set of held-out requests (the built-in writer's requests of a seed the training corpus does not
use: seed 4242, while the corpus uses 1337), each model writes one story per request, prompted with the
request in the training template (storyllama.sample.request_prompt; a model never tuned on requests reads
the same text as plain text). Reported per model:

- word inclusion: the share of requested words that appear in the story, matched by word form (below);
- feature rate: for each feature checkable by rule, the share of the stories asked for it that satisfy it.

Word forms (`word_forms`): a word matches a story word when their sets of candidate base forms meet. The
candidates of a lowercase word are the word itself and what these rules strip, keeping bases of 3+ letters:
plural/3rd person -s, -es, -ies -> -y ("kites", "wishes", "puppies"); past -ed, -d, -ied -> -y ("jumped",
"liked", "cried"); -ing, -ing -> -e ("running" via the doubled consonant, "making"); a doubled final
consonant before -ed/-ing ("stopped", "running"); comparative/superlative -er, -est ("bigger", "happiest"
-> "happy"); and a small table of irregular forms (ran/run, went/go, saw/see, ate/eat, mice/mouse, ...).
So kite/kites, run/ran/running, happy/happier match; "kit" would also match "kites" (the rules overgenerate a
little, never across unrelated long words).

Features checked by rule (`check_feature`), on the story text:
- Dialogue: a quotation mark (" or a curly one) anywhere;
- MoralValue: one of the last two sentences says "learn..." or "lesson";
- BadEnding: the closing (the last three sentences that are not a moral line) has a sad word (sad, cried,
  alone, broke, bored, nobody, ...);
- HappyEnding: the closing has a happy word (happy, smiled, laughed, hug, joy, fun, glad, best, ...) and no
  sad one;
- Twist: the word "surprise" (a proxy: what the built-in writer's twists say; a real twist needs a reader).
Foreshadowing and Conflict have no rule and are not scored.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

IRREGULAR = {  # form -> base
    "ran": "run", "went": "go", "gone": "go", "saw": "see", "seen": "see", "ate": "eat", "eaten": "eat",
    "came": "come", "took": "take", "taken": "take", "gave": "give", "given": "give", "made": "make",
    "found": "find", "felt": "feel", "held": "hold", "knew": "know", "known": "know", "thought": "think",
    "told": "tell", "said": "say", "got": "get", "flew": "fly", "flown": "fly", "sang": "sing", "sung": "sing",
    "swam": "swim", "drank": "drink", "fell": "fall", "fallen": "fall", "broke": "break", "broken": "break",
    "threw": "throw", "thrown": "throw", "caught": "catch", "bought": "buy", "brought": "bring", "built": "build",
    "began": "begin", "begun": "begin", "drew": "draw", "drove": "drive", "hid": "hide", "hidden": "hide",
    "lost": "lose", "left": "leave", "met": "meet", "slept": "sleep", "stood": "stand", "sat": "sit",
    "woke": "wake", "wore": "wear", "won": "win", "wrote": "write", "rode": "ride", "shook": "shake",
    "was": "be", "were": "be", "been": "be", "is": "be", "are": "be", "had": "have", "has": "have", "did": "do",
    "does": "do", "better": "good", "best": "good", "worse": "bad", "worst": "bad",
    "mice": "mouse", "children": "child", "feet": "foot", "teeth": "tooth", "geese": "goose", "men": "man",
    "women": "woman", "people": "person", "leaves": "leaf", "wolves": "wolf", "knives": "knife", "lives": "life",
}
_VOWELS = set("aeiou")
_WORD = re.compile(r"[a-z]+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]*[\"”’']*")
# No "scared" or "lost": happy endings say "not scared anymore" and "lost" names a plot, not an ending.
SAD_WORDS = {"sad", "sadly", "cried", "cry", "crying", "alone", "broke", "bored", "boring", "nobody", "angry",
             "tears", "upset", "lonely", "unhappy"}
HAPPY_WORDS = {"happy", "happily", "smiled", "smile", "smiling", "laughed", "laugh", "laughing", "hug", "hugged",
               "joy", "fun", "glad", "best", "love", "loved", "proud", "friends", "cake", "yay"}
RULE_FEATURES = ("Dialogue", "HappyEnding", "BadEnding", "MoralValue", "Twist")


def word_forms(word: str) -> set[str]:
    """Candidate base forms of a word (module docstring): the word itself and what the rules strip."""
    w = word.lower()
    out = {w}
    if w in IRREGULAR:
        out.add(IRREGULAR[w])

    def add(base: str) -> None:
        if len(base) >= 3:
            out.add(base)
            if len(base) >= 4 and base[-1] == base[-2] and base[-1] not in _VOWELS:  # running -> runn -> run
                out.add(base[:-1])

    for suffix in ("s", "es", "ed", "d", "ing", "er", "est"):
        if w.endswith(suffix) and len(w) > len(suffix):
            add(w[: -len(suffix)])
    for suffix in ("ies", "ied", "ier", "iest"):
        if w.endswith(suffix):
            add(w[: -len(suffix)] + "y")
    if w.endswith("ing"):
        add(w[:-3] + "e")  # making -> make
    return out


def uses_word(story: str, word: str) -> bool:
    """Whether the story has a form of `word` (word_forms on both sides)."""
    want = word_forms(word)
    return any(word_forms(w) & want for w in set(_WORD.findall(story.lower())))


def _sentences(story: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(story) if s.strip()]


def _is_moral(sentence: str) -> bool:
    s = sentence.lower()
    return "learn" in s or "lesson" in s


def check_feature(story: str, feature: str) -> bool | None:
    """Whether the story has `feature` by its rule (module docstring); None when no rule checks it."""
    sentences = _sentences(story)
    closing = {w for s in [s for s in sentences if not _is_moral(s)][-3:] for w in _WORD.findall(s.lower())}
    if feature == "Dialogue":
        return any(q in story for q in ('"', "“", "”"))
    if feature == "MoralValue":
        return any(_is_moral(s) for s in sentences[-2:])
    if feature == "BadEnding":
        return bool(closing & SAD_WORDS)
    if feature == "HappyEnding":
        return bool(closing & HAPPY_WORDS) and not closing & SAD_WORDS
    if feature == "Twist":
        return "surprise" in story.lower()
    return None


@dataclass
class Score:
    words_asked: int = 0
    words_used: int = 0
    features: dict[str, list[int]] = field(default_factory=dict)  # feature -> [asked, satisfied]

    def add(self, request, story: str) -> None:
        for w in request.words:
            self.words_asked += 1
            self.words_used += uses_word(story, w)
        for f in request.features:
            ok = check_feature(story, f)
            if ok is not None:
                counts = self.features.setdefault(f, [0, 0])
                counts[0] += 1
                counts[1] += ok

    @property
    def word_rate(self) -> float:
        return self.words_used / max(self.words_asked, 1)

    @property
    def feature_rate(self) -> float:
        asked = sum(a for a, _ in self.features.values())
        return sum(s for _, s in self.features.values()) / max(asked, 1)


def held_out_requests(n: int, seed: int = 4242) -> list:
    """The fixed held-out set: the built-in writer's first `n` requests of `seed` (the corpus uses 1337)."""
    from storyllama.data_prep.builtin import write_instruct_story

    return [write_instruct_story(seed, i)[0] for i in range(n)]


def write_stories(model, enc, requests: list, max_new_tokens: int = 220, temperature: float = 0.7, top_k: int = 50,
                  seed: int = 0, batch: int = 50) -> list[str]:
    """One story per request, prompted with the request in the training template, in batches."""
    from storyllama.config import SampleConfig
    from storyllama.sample import generate, request_prompt

    stories = []
    for i in range(0, len(requests), batch):
        part = requests[i : i + batch]
        prompts = [request_prompt(enc, r.words, r.features, r.summary) for r in part]
        room = model.cfg.block_size - max(len(p) for p in prompts)
        cfg = SampleConfig(max_new_tokens=min(max_new_tokens, room), temperature=temperature, top_k=top_k,
                           seed=seed + i)
        for ids in generate(model, prompts, cfg, enc.eot_token, enc.n_vocab):
            stories.append(enc.decode([t for t in ids if t != enc.eot_token and t < enc.n_vocab]))
    return stories


def score_model(model, enc, requests: list, **kw) -> tuple[Score, list[str]]:
    stories = write_stories(model, enc, requests, **kw)
    score = Score()
    for r, s in zip(requests, stories, strict=True):
        score.add(r, s)
    return score, stories


def table(rows: list[tuple[str, Score]]) -> str:
    feats = [f for f in RULE_FEATURES if any(f in s.features for _, s in rows)]
    head = "| model | word inclusion | features satisfied | " + " | ".join(feats) + " |"
    lines = [head, "|" + " --- |" * (3 + len(feats))]
    for name, s in rows:
        cells = [f"{100 * s.features[f][1] / s.features[f][0]:.0f}% of {s.features[f][0]}" if f in s.features
                 else "" for f in feats]
        lines.append(f"| {name} | {100 * s.word_rate:.1f}% ({s.words_used}/{s.words_asked}) | "
                     f"{100 * s.feature_rate:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser(prog: str = "instruct_score"):
    from storyllama.checkpoint import add_trust_flag
    from storyllama.config import SAMPLE_LIMITS, OneLineErrorParser
    from storyllama.inputs import SEED, Whole

    p = OneLineErrorParser(prog=prog, description="Score story requests: word inclusion and feature rates of each "
                           "model on a fixed set of held-out built-in requests.")
    p.add_argument("--run", action="append", required=True, help="a run or checkpoint directory (repeatable)")
    p.add_argument("--requests", type=Whole(1, 100_000).parse, default=200,
                   help="held-out requests each model answers, 1 to 100,000 (default 200)")
    p.add_argument("--seed", type=SEED.parse, default=4242,
                   help="seed of the held-out requests (default 4242; the corpus uses 1337)")
    p.add_argument("--temperature", type=SAMPLE_LIMITS["temperature"].parse, default=0.7,
                   help="sampling temperature (default 0.7)")
    p.add_argument("--max_new_tokens", type=SAMPLE_LIMITS["max_new_tokens"].parse, default=220,
                   help="new tokens per story at most (default 220)")
    p.add_argument("--show", type=Whole(0, 100_000).parse, default=1,
                   help="print this many stories of each model (default 1)")
    add_trust_flag(p)
    return p


def main(argv: list[str] | None = None, prog: str = "instruct_score") -> int:
    import torch

    from storyllama.checkpoint import trust_unverified
    from storyllama.sample import load_for_sampling

    a = build_parser(prog).parse_args(argv)
    trust_unverified(a.trust_unverified)
    requests = held_out_requests(a.requests, a.seed)
    rows = []
    for run in a.run:
        t0 = time.perf_counter()
        try:
            model, enc, ckpt = load_for_sampling(run, torch.device("cpu"), torch.float32)
            score, stories = score_model(model, enc, requests, max_new_tokens=a.max_new_tokens,
                                         temperature=a.temperature)
        except (ValueError, OSError) as e:  # a run that cannot be read, or a request longer than its context
            print(f"{prog}: error: {run}: {e}", file=sys.stderr)
            return 2
        print(f"{run} ({ckpt}): {len(requests)} requests in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for r, s in list(zip(requests, stories))[: a.show]:
            print(f"--- {run}\n{r.text()}{s}\n", file=sys.stderr)
        rows.append((run, score))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
