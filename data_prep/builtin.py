"""A seeded procedural writer of bedtime stories, so the demo and the tests need no download.

Each story draws a cast (a hero, a friend, a grown-up or wise helper), a place, an object and one
of several small plots (something lost, stuck, broken, shared, feared, hurt, ...). A plot is a
chain of beats, each written by one of several phrasings, with dialogue, a problem, an attempt and
a resolution, and an ending that names what was learnt. Story `i` of seed `s` comes from its own
`random.Random`, so a corpus is deterministic for (seed, count) and any story can be made alone.
"""

from __future__ import annotations

import contextvars
import random
import re
from collections.abc import Callable

GENERATOR_VERSION = 1  # bump when the text for a (seed, index) changes; recorded in meta.json

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Zoe", "Lucy", "Emma", "Rosie", "Ella", "Maya", "Daisy", "Nora", "Ruby",
         "Ivy", "Kim", "Sara"]
BOYS = ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Finn", "Noah", "Leo", "Jake", "Eli", "Owen", "Ned",
        "Bob", "Theo"]
ANIMALS = ["bunny", "puppy", "kitten", "mouse", "bear cub", "duckling", "fox", "turtle", "squirrel", "lamb",
           "frog", "piglet", "owl", "hedgehog"]
ANIMAL_NAMES = ["Pip", "Coco", "Dot", "Fuzzy", "Hoppy", "Nibbles", "Patch", "Snowy", "Sunny", "Whiskers",
                "Buttons", "Pebble", "Maple", "Clover", "Bumble", "Tiny"]
# Invented names (pets, toys, towns) give the corpus an open vocabulary, so a BPE of a few thousand
# tokens has something to learn, and a model must copy names it has never seen from the context.
NAME_START = ["Bo", "Bi", "Pi", "Lu", "Mo", "Ti", "Zu", "Ka", "Fi", "Ro", "Ne", "Wi", "Da", "Go", "Ju", "Su", "Te",
              "Po", "Mi", "Ra", "Ba", "Fe", "No", "Tu", "Ko", "Le", "Vi", "Hu", "Ze", "Pa", "Gi", "Do", "Ya", "Chi"]
NAME_MIDDLE = ["b", "bb", "l", "ll", "m", "mm", "n", "nn", "p", "pp", "t", "tt", "z", "zz", "ck", "r", "ng", "sh"]
NAME_END = ["o", "y", "i", "a", "le", "ie", "ix", "us", "et", "er", "on", "in", "ey", "ba", "lo", "wick", "kin"]
TOWN_START = ["Bramble", "Willow", "Honey", "Maple", "Pebble", "Apple", "Berry", "Bluebell", "Clover", "Daisy",
              "Fern", "Hazel", "Moss", "Oak", "Pine", "Rose", "Sunny", "Thistle", "Meadow", "Cherry", "Acorn",
              "Button", "Candle", "Frost", "Misty", "Puddle", "Rain", "Shell", "Star", "Silver"]
TOWN_END = ["ton", "brook", "vale", "wood", "field", "by", "dale", "hill", "ford", "bridge", "hollow", "mere",
            "stead", "well", "burrow"]
PLACES = [("a little house near the woods", "in the garden"), ("a sunny town", "in the park"),
          ("a big farm", "in the barn"), ("a small village by the sea", "on the beach"),
          ("a cozy cottage on a hill", "on the hill"), ("a busy street", "in the yard"),
          ("a green forest", "under the big oak tree"), ("a quiet pond", "by the pond"),
          ("a warm house with a red door", "in the living room")]
OBJECTS = ["red ball", "blue kite", "shiny stone", "toy boat", "teddy bear", "little drum", "yellow hat",
           "picture book", "jar of honey", "wooden car", "green scarf", "toy robot", "magic wand", "music box",
           "paper crown", "pink balloon"]
HELPERS = ["Mom", "Dad", "Grandma", "Grandpa"]
WISE = ["a wise old owl", "a kind old turtle", "a friendly farmer", "a gentle cow", "a tall giraffe"]
SPOTS = ["under the bed", "behind the sofa", "in the toy box", "under a big leaf", "near the fence",
         "in the tall grass", "by the door", "under the table", "in the sandbox", "behind a tree"]
OPENINGS = ["Once upon a time, in {home}, there lived {intro}.", "One day, {intro} was playing {spot}.",
            "There was once {intro} who lived in {home}.", "Once upon a time, there was {intro}.",
            "In {home}, there lived {intro}.", "In the town of {town}, there lived {intro}.",
            "Once upon a time, in a place called {town}, there was {intro}.",
            "Far away, in the village of {town}, lived {intro}."]
LIKES = ["{He} loved to run and jump all day.", "{He} liked to sing songs and play games.",
         "{His} favorite thing in the world was {his} {obj}.", "{He} was small, but {he} was very curious.",
         "Every morning, {he} went outside to see the sun.", "{He} had a best friend named {Friend}.",
         "{He} had a toy {toy} named {pet}, and {he} took {pet} everywhere.",
         "{He} lived with {Helper} and a funny little {pet_kind} called {pet}."]
WEATHER = ["The sun was shining and the birds were singing.", "It was a warm and windy day.",
           "The sky was blue and the flowers smelled sweet.", "It was a cold morning, and the grass was wet.",
           "Big white clouds floated in the sky."]
FEELINGS_GOOD = ["happy", "proud", "glad", "excited"]
MORALS = {
    "lost": ["that it is good to ask for help", "to keep {his} things in a safe place",
             "that friends help each other look"],
    "stuck": ["that two friends can do what one cannot", "that a good idea is better than a big jump"],
    "share": ["that sharing makes playing more fun", "that taking turns is fair"],
    "fear": ["that things are less scary when you look closely", "that being brave means trying even when "
             "you are scared"],
    "broken": ["that telling the truth is always best", "that saying sorry makes things better"],
    "hurt": ["that being kind to small animals is important", "that caring for others feels good"],
    "shy": ["that saying hello is how friendships start", "that new friends are waiting everywhere"],
    "rain": ["that a rainy day can be fun too", "that you can find joy anywhere"],
    "lostway": ["to stay close to home", "that it is smart to stop and think when you are lost"],
    "race": ["that helping a friend is better than winning", "that finishing together is the best prize"],
}


def invent_name(rng: random.Random) -> str:
    """A made-up, pronounceable name such as "Bobbo", "Zuzzy" or "Tillet"."""
    if rng.random() < 0.25:
        return rng.choice(NAME_START) + rng.choice(NAME_END)
    return rng.choice(NAME_START) + rng.choice(NAME_MIDDLE) + rng.choice(NAME_END)


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _person(rng: random.Random, prefix: str, exclude: str = "") -> dict[str, str]:
    """A hero or friend: a child or a small animal, with name, description and pronouns."""
    girl = rng.random() < 0.5
    if rng.random() < 0.6:
        name = rng.choice([n for n in (GIRLS if girl else BOYS) if n != exclude])
        kind = rng.choice(["little girl", "girl", "kind girl", "happy girl"] if girl
                          else ["little boy", "boy", "brave boy", "happy boy"])
    else:
        name = rng.choice([n for n in ANIMAL_NAMES if n != exclude]) if rng.random() < 0.3 else invent_name(rng)
        kind = rng.choice(["little ", "small ", "fluffy ", "curious ", ""]) + rng.choice(ANIMALS)
    he, him, his = ("she", "her", "her") if girl else ("he", "him", "his")
    p = {"": name, "kind": kind, "he": he, "him": him, "his": his}
    out = {prefix + k: v for k, v in p.items()}
    out.update({_cap(prefix) + _cap(k) if prefix else _cap(k): _cap(v) for k, v in p.items() if k})
    return out


def _beat(rng: random.Random, f: dict[str, str], *choices: str) -> str:
    return rng.choice(choices).format(**f)


# Whether the story being written has dialogue (the instruct writer's "Dialogue" feature). Without it, each
# line of speech is narrated instead (no quotation marks), with the same random draws, so the plot is the same.
_DIALOGUE: contextvars.ContextVar[bool] = contextvars.ContextVar("builtin_dialogue", default=True)
_NARRATED = {"said": "spoke up", "asked": "asked about it", "shouted": "called out", "whispered": "said it softly"}


def _say(rng: random.Random, who: str, line: str) -> str:
    """A line of dialogue, with the speaker before or after it (narrated when the story has no dialogue)."""
    verb = rng.choice(["said", "said", "asked" if line.endswith("?") else "shouted" if line.endswith("!")
                       else "whispered"])
    before = rng.random() < 0.5
    if not _DIALOGUE.get():
        return f"{who} {_NARRATED[verb]}."
    if before:
        return f'{who} {verb}, "{line}"'
    quoted = line[:-1] + "," if line.endswith(".") else line  # "It was nothing," Mia said.
    return f'"{quoted}" {who} {verb}.'


def _quoted(with_quote: str, narrated: str) -> str:
    return with_quote if _DIALOGUE.get() else narrated



# ---------------------------------------------------------------------------------------------
# Plots: each returns paragraphs (lists of sentences) and the key of its moral


def _lost(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    spots = rng.sample(SPOTS, 3)
    p1 = [_beat(rng, f, "One morning, {Hero} could not find {his} {obj}.",
                "One day, {Hero} looked for {his} {obj}, but it was gone!",
                "After lunch, {Hero} wanted to play with {his} {obj}, but it was not there."),
          _say(rng, f["Hero"], rng.choice([f"Where is my {f['obj']}?", "Oh no, I lost it!",
                                           f"My {f['obj']} is lost!"]))]
    p2 = [f"{f['He']} looked {spots[0]}, but it was not there.",
          f"{f['He']} looked {spots[1]}, but it was not there either.",
          _beat(rng, f, "{Hero} felt sad and sat down.", "{Hero} began to cry.", "{Hero} was very worried.")]
    who = rng.choice([f["Friend"], f["Helper"]])
    p3 = [rng.choice([f"Then {who} came by.", f"Just then, {who} came in.", f"Soon, {who} saw {f['him']}."]),
          _say(rng, who, rng.choice(["Don't be sad. I will help you look.", "Let's look together!",
                                     "Did you look " + spots[2] + "?"])),
          f"They looked {spots[2]}, and there it was!",
          _beat(rng, f, "{Hero} hugged {his} {obj} and smiled.", "{Hero} jumped up and down with joy.")]
    return [p1, p2, p3], "lost"


def _stuck(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    high = rng.choice(["up in a tall tree", "on the roof", "on a high branch", "on top of the shed"])
    p1 = [_beat(rng, f, "{Hero} and {Friend} were playing with the {obj} {spot}.",
                "{Hero} threw {his} {obj} high into the air."),
          f"Oh no! The {f['obj']} landed {high}.",
          _say(rng, f["Hero"], rng.choice(["I can't reach it!", "How will we get it down?", "It is too high!"]))]
    p2 = [_beat(rng, f, "{Hero} jumped and jumped, but {he} was too small.",
                "{Hero} tried to climb, but {he} slipped and fell on the soft grass."),
          _beat(rng, f, "Then {Friend} had an idea.", "{Friend} thought very hard."),
          _say(rng, f["Friend"], rng.choice(["Let's use a long stick!", "Stand on my back!",
                                             "Let's ask " + f["wise"] + " to help!"])),
          _beat(rng, f, "They worked together, and the {obj} fell down.",
                "With a little push, the {obj} came down at last.")]
    p3 = [_say(rng, f["Hero"], "Thank you, " + f["Friend"] + "! You are a good friend."),
          _beat(rng, f, "They played until the sun went down.", "They laughed and played all afternoon.")]
    return [p1, p2, p3], "stuck"


def _share(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    p1 = [_beat(rng, f, "{Hero} had a new {obj}.", "{Hero} found {obj_a} {spot}."),
          _beat(rng, f, "{Friend} wanted to play with it too.", "{Friend} saw it and wanted it very much."),
          _say(rng, f["Friend"], rng.choice(["Can I have a turn?", "Please, can I play with it?"])),
          _say(rng, f["Hero"], rng.choice(["No, it is mine!", "No! I want to play with it alone."]))]
    p2 = [_beat(rng, f, "{Friend} felt sad and walked away.", "They both pulled the {obj}, and they both got "
                "angry."),
          _beat(rng, f, "{Helper} saw what happened.", "{Helper} came over and knelt down."),
          _say(rng, f["Helper"], rng.choice(["When we share, everyone can have fun.", "How about you take turns?",
                                             "Why don't you play with it together?"]))]
    p3 = [_beat(rng, f, "{Hero} thought about it.", "{Hero} looked at {Friend} and felt sorry."),
          _say(rng, f["Hero"], rng.choice(["Here, you can go first.", "I'm sorry. Let's play together."])),
          _beat(rng, f, "They took turns, and soon they were laughing.", "Playing together was even more fun.")]
    return [p1, p2, p3], "share"


def _fear(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    thing, truth = rng.choice([("a big dark shadow on the wall", "it was only the shadow of a tree"),
                               ("a loud BOOM in the sky", "it was only thunder, far away"),
                               ("a strange noise outside", "it was only a little cat looking for food"),
                               ("a big dog at the gate", "the dog only wanted to play"),
                               ("something moving in the grass", "it was only a small, slow snail")])
    p1 = [_beat(rng, f, "One night, {Hero} saw " + thing + ".", "One evening, {Hero} heard " + thing + ".",
                "On the way home, {Hero} saw " + thing + "."),
          _beat(rng, f, "{He} was very scared.", "{His} heart went thump, thump, thump."),
          _say(rng, f["Hero"], rng.choice([f"{f['Helper']}, I am scared!", "What is that?", "Help!"]))]
    p2 = [_beat(rng, f, "{Helper} held {his} hand.", "{Helper} gave {him} a warm hug."),
          _say(rng, f["Helper"], rng.choice(["Let's look at it together.", "Don't be afraid. Be brave with me."])),
          f"They looked closely, and {truth}."]
    p3 = [_beat(rng, f, "{Hero} laughed.", "{Hero} was not scared anymore."),
          _say(rng, f["Hero"], rng.choice(["It was nothing!", "I was brave!", "That was not scary at all."]))]
    return [p1, p2, p3], "fear"


def _broken(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    item = rng.choice(["vase", "cup", "lamp", "plate", "clock", "bowl"])
    p1 = [_beat(rng, f, "{Hero} was playing with {his} {obj} in the house.", "{Hero} was running in the house."),
          f"Crash! {f['He']} knocked over {f['Helper']}'s favorite {item}, and it broke.",
          _beat(rng, f, "{He} hid the pieces under the rug.", "{He} ran to {his} room and hid.")]
    p2 = [_beat(rng, f, "{He} felt bad inside.", "{His} tummy felt funny, and {he} could not play."),
          _quoted(f"When {f['Helper']} came home, {f['hhe']} asked, \"Do you know what happened to my {item}?\"",
                  f"When {f['Helper']} came home, {f['hhe']} asked what happened to the {item}."),
          _beat(rng, f, "{Hero} took a deep breath.", "{Hero} looked down at {his} feet."),
          _say(rng, f["Hero"], rng.choice([f"I broke it. I am sorry, {f['Helper']}.",
                                           "It was me. I did not mean to."]))]
    p3 = [_say(rng, f["Helper"], rng.choice(["Thank you for telling me the truth.", "I am glad you told me."])),
          rng.choice([f"Together they glued the {item} back together.", "They cleaned up the pieces together."]),
          _beat(rng, f, "{Hero} felt light and happy again.", "{Hero} gave {Helper} a big hug.")]
    return [p1, p2, p3], "broken"


def _hurt(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    animal, fix = rng.choice([("a little bird with a hurt wing", "wing"), ("a small kitten with a sore paw", "paw"),
                              ("a baby duck that could not find its mother", "mother"),
                              ("a tiny puppy shaking in the rain", "cold")])
    p1 = [_beat(rng, f, "One day {spot}, {Hero} found " + animal + ".", "{Hero} heard a soft cry and found "
                + animal + "."),
          _say(rng, f["Hero"], rng.choice(["Poor thing! I will help you.", "Don't worry, little one."]))]
    end = {"wing": "Soon the bird could fly again, and it sang a happy song.",
           "paw": "Soon the kitten could run and play again.",
           "mother": "They found the mother duck by the pond, and the baby duck quacked with joy.",
           "cold": "Soon the puppy was warm and dry, and it licked {Hero}'s face."}[fix]
    p2 = [_beat(rng, f, "{He} carried it home very gently.", "{He} made a soft bed from an old box."),
          _beat(rng, f, "{Helper} helped {him} take care of it.", "{Friend} brought some water and food."),
          end.format(**f)]
    p3 = [_beat(rng, f, "{Hero} waved goodbye.", "{Hero} smiled a big smile."),
          _say(rng, f["Hero"], rng.choice(["Goodbye, friend! Come back soon!", "I am so happy you are well!"]))]
    return [p1, p2, p3], "hurt"


def _shy(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    p1 = [_beat(rng, f, "{Hero} was very shy.", "{Hero} did not like to talk to new friends."),
          _beat(rng, f, "One day {spot}, {he} saw {Friend} the {fkind} sitting all alone.",
                "At the park, a new {fkind} named {Friend} was sitting by {fhim}self.")]
    p2 = [_beat(rng, f, "{Hero} wanted to say hello, but {he} was scared.", "{Hero} hid behind {Helper}."),
          _say(rng, f["Helper"], rng.choice(["Go on. Just say hello.", "Maybe " + f["Friend"]
                                             + " feels shy too."])),
          f"{f['Hero']} walked over slowly.",
          _say(rng, f["Hero"], rng.choice(["Hello. Do you want to play?", f"Hi! Do you like my {f['obj']}?"]))]
    p3 = [_say(rng, f["Friend"], rng.choice(["Yes, please!", "I would love to!"])),
          _beat(rng, f, "They played all day and became best friends.", "Soon they were laughing like old friends.")]
    return [p1, p2, p3], "shy"


def _rain(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    plan = rng.choice(["have a picnic", "fly {his} kite", "play ball", "go to the beach"]).format(**f)
    fun = rng.choice(["built a big fort with pillows and blankets", "baked yummy cookies",
                      "painted pictures of the sun", "made a puppet show"])
    p1 = [f"{f['Hero']} and {f['Friend']} wanted to {plan}.",
          _beat(rng, f, "But then dark clouds came, and it began to rain.", "Drip, drop! Rain started to fall."),
          _say(rng, f["Hero"], rng.choice(["Now the day is ruined!", "Oh no, we can't go out!"]))]
    p2 = [_say(rng, f["Helper"], rng.choice(["We can have fun inside!", "I have an idea!"])),
          f"So they {fun}."]
    p3 = [_beat(rng, f, "When the rain stopped, a big rainbow came out.", "Later, the sun came back out."),
          _beat(rng, f, "It was the best day ever.", "{Hero} said it was the best rainy day of all.")]
    return [p1, p2, p3], "rain"


def _lostway(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    lure = rng.choice(["a pretty butterfly", "a little yellow bird", "a rolling ball", "a hopping frog"])
    guide = rng.choice(["the river", "the path of white stones", "the smell of {Helper}'s soup",
                        "the big star in the sky"]).format(**f)
    p1 = [f"One day, {f['Hero']} followed {lure} far into the woods.",
          _beat(rng, f, "Soon, {he} did not know where {he} was.", "When {he} looked around, everything looked new."),
          _say(rng, f["Hero"], rng.choice(["I am lost!", "Which way is home?"]))]
    p2 = [_beat(rng, f, "Then {he} remembered what {Helper} always said.", "{He} stopped and took a deep breath."),
          _quoted(f'"If you are lost, follow {guide}," {f["he"]} said to {f["him"]}self.',
                  f"{f['He']} remembered that when you are lost, you should follow {guide}."),
          f"So {f['he']} followed {guide}, step by step."]
    p3 = [_beat(rng, f, "At last {he} saw {his} home.", "Soon {he} was back home."),
          _beat(rng, f, "{Helper} gave {him} a big hug.", "{Helper} was so happy to see {him}.")]
    return [p1, p2, p3], "lostway"


def _race(rng: random.Random, f: dict[str, str]) -> tuple[list[list[str]], str]:
    p1 = [f"{f['Hero']} and {f['Friend']} had a race {f['spot']}.",
          _say(rng, f["Friend"], rng.choice(["Ready, set, go!", "Let's see who is faster!"])),
          _beat(rng, f, "They ran as fast as they could.", "They ran and ran.")]
    p2 = [_beat(rng, f, "Then {Friend} tripped on a rock and fell.", "Suddenly, {Friend} fell down and hurt {fhis} "
                "knee."),
          _beat(rng, f, "{Hero} could win the race, but {he} stopped.", "{Hero} stopped running right away."),
          _say(rng, f["Hero"], rng.choice(["Are you okay?", "Let me help you up."]))]
    p3 = [_beat(rng, f, "They walked to the finish together, hand in hand.", "They finished the race together."),
          _say(rng, f["Friend"], rng.choice(["You are the best friend ever!", "Thank you for stopping for me."]))]
    return [p1, p2, p3], "race"


PLOTS: list[Callable[[random.Random, dict[str, str]], tuple[list[list[str]], str]]] = [
    _lost, _stuck, _share, _fear, _broken, _hurt, _shy, _rain, _lostway, _race]


def write_story(seed: int, index: int) -> str:
    """Story `index` of the corpus of `seed`: a few paragraphs separated by blank lines."""
    rng = random.Random(seed * 1_000_003 + index)
    f, opening = _cast_and_opening(rng)
    paragraphs, moral = rng.choice(PLOTS)(rng, f)
    ending = rng.choice(["From that day on, {Hero} knew {moral}.", "{Hero} learned {moral}.",
                         "That night, {Hero} went to bed {feeling}, because {he} had learned {moral}.",
                         "And {Hero} never forgot {moral}."])
    moral_text = rng.choice(MORALS[moral]).format(**f)
    paragraphs[-1].append(ending.format(moral=moral_text, feeling=rng.choice(FEELINGS_GOOD), **f))
    return "\n\n".join(" ".join(p) for p in [opening, *paragraphs])


def _cast_and_opening(rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """The cast, place and object of a story, and its opening sentences."""
    home, spot = rng.choice(PLACES)
    f = _person(rng, "")
    f = {("Hero" if k == "" else k): v for k, v in f.items()}
    friend = _person(rng, "f", exclude=f["Hero"])
    f.update({"Friend": friend["f"], "fkind": friend["fkind"], "fhe": friend["fhe"], "fhim": friend["fhim"],
              "fhis": friend["fhis"]})
    obj = rng.choice(OBJECTS)
    helper = rng.choice(HELPERS)
    f.update({"home": home, "spot": spot, "obj": obj, "obj_a": _a(obj), "Helper": helper,
              "hhe": "she" if helper in ("Mom", "Grandma") else "he",
              "wise": rng.choice(WISE), "intro": _a(f["kind"]) + " named " + f["Hero"],
              "town": rng.choice(TOWN_START) + rng.choice(TOWN_END), "pet": invent_name(rng),
              "pet_kind": rng.choice(ANIMALS), "toy": rng.choice(["bear", "dog", "bunny", "horse", "robot", "duck"])})
    opening = [_beat(rng, f, *OPENINGS)]
    opening += rng.sample([s.format(**f) for s in LIKES], rng.randint(1, 2))
    if rng.random() < 0.5:
        opening.append(rng.choice(WEATHER))
    return f, opening


def write_stories(count: int, seed: int) -> list[str]:
    """`count` stories for `seed` (about 0.7 KB each)."""
    return [write_story(seed, i) for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Story requests (bin/prepare_data --builtin --instruct): a story with the features drawn for it, and the
# request that asks for what it holds.
#
# Features, each written only where the writer can honestly produce it:
# - Dialogue: the characters' lines are quoted; without it every line of speech is narrated ("Ben called
#   out."), so the story has no quotation marks;
# - BadEnding: the plot's resolution is replaced by a sad one (the thing stays lost, the friend goes home,
#   ...); HappyEnding (asked in half of the happy stories): the story closes with a happy line;
# - MoralValue: a closing paragraph says what the hero learned; without it no moral is said;
# - Twist: a surprising turn before the end ("To everyone's surprise, ...").
# Words: two or three of the words the writer chose for this story's slots, the ones a reader would ask for
# (SLOT_WORDS: the object, an animal, the place, the weather, the plot's own thing), each found in the story,
# taken from different slots where the story has them; never names or phrasing words ("said", "near").

INSTRUCT_VERSION = 2  # bump when the pairs for a (seed, index) change; recorded in meta.json

BAD_ENDINGS = {  # plot -> (sentences of the plot kept: (paragraph, count) ...), the sad paragraph
    "lost": ((0, 99), (1, 99)), "stuck": ((0, 99), (1, 3)), "share": ((0, 99),), "fear": ((0, 99),),
    "broken": ((0, 99), (1, 2)), "hurt": ((0, 99),), "shy": ((0, 99), (1, 1)), "rain": ((0, 99),),
    "lostway": ((0, 99),), "race": ((0, 99), (1, 1)),
}
SAD_PARAGRAPHS = {
    "lost": ["They looked everywhere, but the {obj} was never found.", "{Hero} went to bed sad that night."],
    "stuck": ["They tried and tried, but the {obj} stayed up there.", "Then the wind blew it far away.",
              "{Hero} cried all the way home."],
    "share": ["{Friend} grabbed the {obj} and pulled hard.", "Snap! The {obj} broke in two.",
              "Now nobody could play with it, and they both cried."],
    "fear": ["{Hero} ran away and hid under {his} blanket.", "{He} did not sleep all night.",
             "{He} stayed sad and scared for a long time."],
    "broken": ["{Hero} said nothing and ran away.", "Later, {Helper} found the broken pieces.",
               "{Helper} was very sad, and {Hero} felt bad for a long time."],
    "hurt": ["{Hero} tried to help, but the poor animal ran away into the woods.",
             "{Hero} never saw it again and felt sad."],
    "shy": ["{Hero} was too scared to say hello.", "Soon {Friend} went home, and {Hero} sat alone.",
            "{He} felt sad all day."],
    "rain": ["They sat by the window and waited, but the rain did not stop.",
             "The day was gray and boring, and they were sad."],
    "lostway": ["{Hero} walked and walked, but every tree looked the same.",
                "It got dark and cold, and {he} cried and cried.", "{He} was sad and scared all night."],
    "race": ["But {Hero} did not stop.", "{He} ran on and won the race, but {Friend} sat alone and cried.",
             "Nobody was happy at the end, and {Hero} felt sad."],
}
HAPPY_CLOSINGS = ["Everyone was happy.", "{Hero} smiled all day long.", "It was a happy day for everyone.",
                  "{Hero} was very happy."]
TWISTS = ["To everyone's surprise, the {obj} began to glow, and a tiny fairy flew out of it.",
          "To everyone's surprise, a little bird flew down and landed on {Hero}'s head.",
          "To everyone's surprise, {Helper} had a big secret: it was {Hero}'s birthday, and there was cake!",
          "To everyone's surprise, the old {obj} was really magic and could talk."]
MORAL_LINES = ["{Hero} learned {moral}.", "That day, {Hero} learned {moral}.", "The lesson of the day was {moral}."]
_WORD_RE = re.compile(r"[a-z]+")


def _object_word(obj: str) -> str:
    return {"teddy bear": "teddy", "music box": "music"}.get(obj, obj.split()[-1])  # "blue kite" -> "kite"


# The writer's slots and the word that names each filler: what a request can ask for. A word counts for a story
# when the story has it (in that exact form).
SLOT_WORDS: dict[str, tuple[str, ...]] = {
    "object": tuple(_object_word(o) for o in OBJECTS),
    "animal": tuple(dict.fromkeys(a.split()[-1] for a in ANIMALS)),  # "bear cub" -> "cub"
    "place": ("woods", "town", "farm", "village", "sea", "cottage", "hill", "street", "forest", "pond", "garden",
              "park", "barn", "beach", "yard", "oak"),
    "weather": ("sun", "birds", "windy", "flowers", "cold", "grass", "clouds"),
    # the plots' own things: what got stuck where, what scared, what broke, who was hurt, the plan spoilt by the
    # rain and the fun instead, what lured the hero away and what led home, where lost things were found
    "plot": ("rain", "race", "shy", "tree", "roof", "branch", "shed", "shadow", "thunder", "noise", "dog", "snail",
             "vase", "cup", "lamp", "plate", "clock", "bowl", "bird", "duck", "wing", "paw", "picnic", "fort",
             "cookies", "pictures", "puppet", "butterfly", "river", "stones", "soup", "star", "bed", "sofa",
             "fence", "leaf", "table", "sandbox", "rainbow", "fairy", "cake"),
}


def slot_words(story: str) -> dict[str, list[str]]:
    """The slot words the story has, by slot, in the order of SLOT_WORDS (a word belongs to its first slot)."""
    have = set(_WORD_RE.findall(story.lower()))
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    for slot, words in SLOT_WORDS.items():
        found = [w for w in words if w in have and w not in seen]
        seen.update(found)
        if found:
            out[slot] = found
    return out


def pick_words(rng: random.Random, story: str, n: int) -> list[str]:
    """`n` of the story's slot words (fewer when it has fewer), one per slot first, in a random order."""
    by_slot = slot_words(story)
    slots = rng.sample(list(by_slot), len(by_slot))
    firsts = [rng.choice(by_slot[s]) for s in slots]
    rest = [w for s in slots for w in by_slot[s] if w not in firsts]
    words = firsts[:n] + rng.sample(rest, min(len(rest), max(0, n - len(firsts))))
    return rng.sample(words, len(words))


def _instruct_text(rng: random.Random, feats: set[str]) -> str:
    token = _DIALOGUE.set("Dialogue" in feats)
    try:
        f, opening = _cast_and_opening(rng)
        paragraphs, key = rng.choice(PLOTS)(rng, f)
    finally:
        _DIALOGUE.reset(token)
    if "BadEnding" in feats:
        paragraphs = [paragraphs[i][:n] for i, n in BAD_ENDINGS[key]]
        paragraphs.append([s.format(**f) for s in SAD_PARAGRAPHS[key]])
    if "Twist" in feats:
        paragraphs[-1].insert(max(1, len(paragraphs[-1]) - 1), rng.choice(TWISTS).format(**f))
    if "HappyEnding" in feats:
        paragraphs[-1].append(rng.choice(HAPPY_CLOSINGS).format(**f))
    if "MoralValue" in feats:
        paragraphs.append([rng.choice(MORAL_LINES).format(moral=rng.choice(MORALS[key]).format(**f), **f)])
    return "\n\n".join(" ".join(p) for p in [opening, *paragraphs])


def _draw_features(rng: random.Random) -> set[str]:
    feats = set()
    if rng.random() < 0.6:
        feats.add("Dialogue")
    if rng.random() < 0.3:
        feats.add("BadEnding")
    elif rng.random() < 0.5:
        feats.add("HappyEnding")
    if rng.random() < 0.5:
        feats.add("MoralValue")
    if rng.random() < 0.25:
        feats.add("Twist")
    return feats


def write_instruct_story(seed: int, index: int):
    """(Request, story) `index` of the request corpus of `seed`: the story written with the features drawn
    for it, and a request naming those features and two or three of its slot words (SLOT_WORDS)."""
    from .instruct import Request

    rng = random.Random(f"instruct:{seed}:{index}")
    feats = _draw_features(rng)
    story = _instruct_text(rng, feats)
    if '"' not in story:  # a sad ending can cut every line of speech: the request names only what the story has
        feats.discard("Dialogue")
    words = pick_words(rng, story, rng.choice((2, 3)))
    return Request.make(words=words, features=sorted(feats)), story


def write_instruct_stories(count: int, seed: int) -> list:
    return [write_instruct_story(seed, i) for i in range(count)]
