"""What a compile run hands a user, and how it is written out.

``compile(source, ...)`` goes from a torch module, a spec or an ONNX graph to a checked ``Artifact``;
``Artifact.save(dir)`` writes it. Beside them: atomic output folders, the report, the Triton
repository, the engine cache and the memory estimates.
"""

from attention_compiler.artifacts.artifact import Artifact, CheckFailed, NoEngine
from attention_compiler.artifacts.pipeline import Settings, compile

__all__ = ["Artifact", "CheckFailed", "NoEngine", "Settings", "compile"]
