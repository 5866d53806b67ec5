"""Class-aware prompts (AnoVL's list, which the paper's "same as AnoCLIP" points to): 7 state
phrases per class x 66 sentence forms = 462 sentences per state. The line's product name fills
the states; objects and textures use different picture words."""
from __future__ import annotations

NORMAL_STATES = (
    "normal {}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "abnormal {}",
    "imperfect {}",
    "blemished {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
OBJECT_PICTURES = ("industrial photo", "industrial image", "manufacturing image")
TEXTURE_PICTURES = ("industrial photo", "textural photo", "surface picture")

# (adjective, the article order of the noun phrase, suffix): each gives two forms, one per article
_FORMS = (
    ("cropped", ("the", "a"), ""),
    ("close-up", ("a", "the"), ""),
    ("bright", ("a", "the"), ""),
    ("dark", ("the", "a"), ""),
    ("jpeg corrupted", ("a", "the"), ""),
    ("blurry", ("the", "a"), ""),
    ("", ("a", "the"), ""),
    ("", ("a small", "the small"), ""),
    ("", ("a large", "the large"), ""),
    ("", ("the", "a"), " for visual inspection"),
    ("", ("the", "a"), " for anomaly detection"),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def templates(picture: str) -> list[str]:
    """The 22 sentence forms of one picture word, e.g. 'a cropped industrial photo of the {}'."""
    out = []
    for adjective, articles, suffix in _FORMS:
        head = f"a {adjective} {picture}" if adjective else f"{_article(picture)} {picture}"
        out.extend(f"{head} of {article} {{}}{suffix}" for article in articles)
    return out


def state_sentences(product: str, is_texture: bool, abnormal: bool) -> list[str]:
    """Every sentence of one state class for the product (66 forms x 7 states, form-major)."""
    states = ABNORMAL_STATES if abnormal else NORMAL_STATES
    pictures = TEXTURE_PICTURES if is_texture else OBJECT_PICTURES
    phrases = [s.format(product) for s in states]
    return [form.format(phrase) for picture in pictures for form in templates(picture) for phrase in phrases]
