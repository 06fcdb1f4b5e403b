"""Two-hop questions shared by the benchmarks (hand-written; not drawn from any evaluation split)."""

QUESTIONS = [
    "What is the capital of the country where the Colosseum is located?",
    "Who founded the company that makes the iPhone?",
    "What currency is used in the country where sushi comes from?",
    "What is the capital of the country where Mozart was born?",
    "What is the official language of the country where the Eiffel Tower is located?",
    "What is the nationality of the author of Hamlet?",
    "On which continent is the country whose capital is Lima?",
    "What is the capital of the country where the Taj Mahal is located?",
]

# Ordinary requests (instructions and single-hop questions): what a screen in front of the model should leave alone.
ORDINARY = [
    "Write a two-line poem about the sea.",
    "What is the boiling point of water in Fahrenheit?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Pride and Prejudice?",
    "Name a primary colour.",
    "What is 12 times 12?",
]
