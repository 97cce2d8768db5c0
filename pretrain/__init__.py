"""An LLM pretraining template on Hugging Face Accelerate, with gradient accumulation that is exactly a big batch.

Importing the package registers the `embedding_linear` model with the transformers Auto classes,
so `AutoModelForCausalLM.from_pretrained("<output_dir>/final")` works after `import pretrain`.
"""

from pretrain import models as _models  # noqa: F401  (registration with AutoConfig / AutoModelForCausalLM)
