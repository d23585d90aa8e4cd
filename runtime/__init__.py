"""Pure-Python runner for exported Gemma 4 artifacts (model.pte + model.ptd); see README.md.

Depends on the artifact alone: never imports export/, the model, or ExecuTorch.
"""

from runtime.artifact import Artifact, ArtifactError, Metadata
from runtime.conversation import Conversation
from runtime.runner import ContextOverflowError, GenerationStats, Runner
from runtime.sampling import SamplingConfig
from runtime.tokenizer import TextTokenizer

__all__ = [
    "Artifact", "ArtifactError", "Metadata", "Conversation", "ContextOverflowError", "GenerationStats", "Runner",
    "SamplingConfig", "TextTokenizer",
]
