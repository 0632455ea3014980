import os
import pathlib
import sys

# make the project root importable: `import prepare_data`
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
# Tests never reach the Hugging Face Hub: a judge that is not on disk fails at once instead of
# after network timeouts (huggingface_hub reads this when first imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
