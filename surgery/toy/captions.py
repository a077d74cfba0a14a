"""The toy's text encoder: a closed word vocabulary with learned word, position and word-at-position
embeddings, trained jointly with the transformer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import SurgeryError
from .spec import ASSET_DIR, MAX_WORDS, TEXT_DIM

class CaptionEncoder(nn.Module):
    """Prompts → text embeddings [B, MAX_WORDS, TEXT_DIM]: per word, its word embedding + its
    position's + its own at that position (zero at the start, so training begins from word +
    position); zero padding."""

    def __init__(self, vocabulary: list[str], max_words: int = MAX_WORDS, dim: int = TEXT_DIM):
        super().__init__()
        self.vocabulary = list(vocabulary)
        self._index = {word: i for i, word in enumerate(self.vocabulary)}
        self.words = nn.Parameter(torch.randn(len(self.vocabulary), dim))
        self.positions = nn.Parameter(torch.randn(max_words, dim))
        self.word_at_position = nn.Parameter(torch.zeros(max_words, len(self.vocabulary), dim))

    @property
    def max_words(self) -> int:
        return self.positions.shape[0]

    def word_ids(self, prompt: str) -> list[int]:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise SurgeryError(
                f"the toy model does not know {unknown[0]!r} (in {prompt!r}); it knows: {' '.join(self.vocabulary)}"
            )
        if len(words) > self.max_words:
            raise SurgeryError(f"{prompt!r} has {len(words)} words; the toy model reads at most {self.max_words}")
        return [self._index[w] for w in words]

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.max_words, dtype=torch.long)
        present = torch.zeros(len(prompts), self.max_words, 1)
        for row, prompt in enumerate(prompts):
            words = self.word_ids(prompt)
            ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
            present[row, : len(words)] = 1
        device = self.words.device
        ids = ids.to(device)
        own = self.word_at_position[torch.arange(self.max_words, device=device), ids]  # [B, max_words, dim]
        return (self.words[ids] + self.positions + own) * present.to(device)

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps({"words": self.vocabulary, "max_words": self.max_words}) + "\n")
        tensors = {name: tensor.detach().float().cpu() for name, tensor in self.state_dict().items()}
        save_file(tensors, folder / "embeddings.safetensors")

    @classmethod
    def load(cls, folder: str | Path) -> "CaptionEncoder":
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            vocab = json.loads((folder / "vocab.json").read_text())
            tensors = load_file(folder / "embeddings.safetensors")
            encoder = cls(vocab["words"], vocab["max_words"], tensors["words"].shape[1])
            encoder.load_state_dict(tensors)
        # Missing files, bad JSON, unreadable safetensors; missing or misshapen tensors.
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            message = " ".join(str(e).split())  # torch's state-dict errors span lines
            raise SurgeryError(f"cannot load the caption encoder from {folder}: {message}") from None
        return encoder.eval().requires_grad_(False)


def load_caption_encoder(device=None) -> CaptionEncoder:
    """The shipped toy teacher's caption encoder (without loading its transformer)."""
    return CaptionEncoder.load(ASSET_DIR / "caption_encoder").to(device or "cpu")


def caption_embeddings(captions: list[str]) -> torch.Tensor:
    """The shipped caption encoder's embeddings of `captions`: [len, MAX_WORDS, TEXT_DIM] float32 (CPU)."""
    with torch.no_grad():
        return load_caption_encoder()(list(captions))
