"""Where the repository and its seed configs are, for tests in any folder."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
