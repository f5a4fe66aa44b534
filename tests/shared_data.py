"""Where the real corpora, evaluation sets and tokenizers live: `../shared/data` beside the
repository root, or `$GDN2_SHARED_DATA` (a GPU machine gets a copy carried inside the checkout)."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GDN2_SHARED_DATA") or REPO.parent / "shared" / "data")
