"""What each dataset file looks like: names, sizes, feature widths, sequence lengths, label layout.

One table, used by the reader (to validate files and explain missing ones) and by the simulator (to produce
copies with the real shapes).  Vocabulary: ``l`` / ``a`` / ``v`` for language, audio, vision; the MulT files
call the same arrays ``text`` / ``audio`` / ``vision``.
"""

from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("l", "a", "v")
FILE_KEYS = {"l": "text", "a": "audio", "v": "vision"}  # our name -> key in a MulT split dict
MODALITY_NAMES = {"l": "language", "a": "audio", "v": "vision"}
SPLITS = ("train", "valid", "test")
ALIGNMENTS = ("aligned", "unaligned")
EMOTIONS = ("neutral", "happy", "sad", "angry")  # IEMOCAP label rows, in the MulT files' order
SENTIMENT_RANGE = (-3.0, 3.0)  # MOSI/MOSEI labels: mean annotator rating, -3 (very negative) to 3 (very positive)


@dataclass(frozen=True)
class Layout:
    """The shapes of one data file: every split is {text, audio, vision, labels[, id]}."""

    name: str  # e.g. "mosi_aligned"
    dataset: str  # mosi | mosei | iemocap | a custom name
    alignment: str  # aligned | unaligned
    filename: str  # the file's usual name
    feature_dims: dict[str, int]  # modality -> feature width
    seq_lens: dict[str, int]  # modality -> padded sequence length
    split_sizes: dict[str, int]  # split -> number of utterances in the published file
    label_shape: tuple[int, ...]  # per-utterance label shape: (1, 1) regression or (4, 2) IEMOCAP
    size_mb: float  # approximate size of the published file, for messages
    description: str = ""
    sha256: str | None = None  # checksum, where one is known
    caveat: str = ""  # a real-data fixture: why its numbers must not be read as the corpus's (every table says it)
    label_range: tuple[float, float] | None = None  # the valid regression labels (MOSI/MOSEI sentiment), checked

    @property
    def task(self) -> str:
        return "classification" if self.label_shape == (4, 2) else "regression"


def _mult(dataset, alignment, filename, dims, lens, sizes, label_shape, size_mb, description):
    return Layout(
        name=f"{dataset}_{alignment}",
        dataset=dataset,
        alignment=alignment,
        filename=filename,
        feature_dims=dict(zip(MODALITIES, dims, strict=True)),
        seq_lens=dict(zip(MODALITIES, lens, strict=True)),
        split_sizes=dict(zip(SPLITS, sizes, strict=True)),
        label_shape=label_shape,
        size_mb=size_mb,
        description=description,
        label_range=SENTIMENT_RANGE if label_shape == (1, 1) else None,
    )


# Widths are (l, a, v): GloVe 300 for text; COVAREP audio and Facet vision selections as published with MulT.
# Sequence lengths are (l, a, v); word-aligned files put every modality on the 50 (MOSI/MOSEI) or 20 (IEMOCAP)
# word slots.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in [
        _mult("mosi", "aligned", "mosi_data.pkl", (300, 5, 20), (50, 50, 50), (1284, 229, 686), (1, 1), 147,
              "CMU-MOSI, word-aligned"),
        _mult("mosi", "unaligned", "mosi_data_noalign.pkl", (300, 5, 20), (50, 375, 500), (1284, 229, 686),
              (1, 1), 326, "CMU-MOSI, unaligned"),
        _mult("mosei", "aligned", "mosei_senti_data.pkl", (300, 74, 35), (50, 50, 50), (16265, 1869, 4643),
              (1, 1), 3500, "CMU-MOSEI sentiment, word-aligned"),
        _mult("mosei", "unaligned", "mosei_senti_data_noalign.pkl", (300, 74, 35), (50, 500, 500),
              (16265, 1869, 4643), (1, 1), 12000, "CMU-MOSEI sentiment, unaligned"),
        _mult("iemocap", "aligned", "iemocap_data.pkl", (300, 74, 35), (20, 20, 20), (2717, 798, 938), (4, 2),
              279, "IEMOCAP four emotions, word-aligned"),
        _mult("iemocap", "unaligned", "iemocap_data_noalign.pkl", (300, 74, 35), (20, 400, 500),
              (2717, 798, 938), (4, 2), 1800, "IEMOCAP four emotions, unaligned"),
    ]
}

# The real-data fixture: utterance-level MOSI features (one vector per utterance, sequence length 1).
MOSI_UTTERANCE = Layout(
    name="mosi_utterance",
    dataset="mosi",
    alignment="aligned",
    filename="mosi_poria2017_utt_stdsplit.pkl",
    feature_dims={"l": 100, "a": 73, "v": 100},
    seq_lens={"l": 1, "a": 1, "v": 1},
    split_sizes={"train": 1284, "valid": 229, "test": 686},
    label_shape=(1, 1),
    size_mb=2.5,
    description="CMU-MOSI utterance-level features (Poria et al. 2017), standard folds, sequence length 1",
    sha256="73a81efdd42354ea813d0cd7df12adc54fafb5b63305bd228fc66d126ab2171e",
    caveat="sequence length 1; its text features leak labels; not comparable with the paper",
    label_range=SENTIMENT_RANGE,
)
LAYOUTS[MOSI_UTTERANCE.name] = MOSI_UTTERANCE

DATASETS = ("mosi", "mosei", "iemocap")


def get_layout(dataset: str, alignment: str = "aligned") -> Layout:
    """The layout of a published file, e.g. ``get_layout("mosi", "unaligned")``."""
    key = dataset if dataset in LAYOUTS else f"{dataset}_{alignment}"
    if key not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        raise ValueError(
            f"unknown dataset/alignment {dataset!r}/{alignment!r}; known layouts: {known}. "
            f"dataset is one of {DATASETS}, alignment one of {ALIGNMENTS}."
        )
    return LAYOUTS[key]


def layout_for_filename(filename: str) -> Layout | None:
    """The layout whose usual file name is ``filename`` (just the base name), or None."""
    for layout in LAYOUTS.values():
        if layout.filename == filename:
            return layout
    return None
