import pathlib
import sys

# make the project root importable: `import prepare_data`
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
