"""AdaptCLIP's static text prompts: state words x 21 templates, filled with one class-agnostic noun."""

NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
ABNORMAL_STATES = [
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
]
# 21 templates; the "jpeg corrupted" one appears twice in the authors' list, and so here (it
# weighs twice in the mean).
TEMPLATES = [
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
]


def state_sentences(states: list[str], noun: str) -> list[str]:
    """Every (state x template) sentence of one state class (7 x 21 = 147 normal, 4 x 21 = 84 abnormal)."""
    return [t.format(s.format(noun)) for s in states for t in TEMPLATES]
