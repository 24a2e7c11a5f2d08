"""Released Alembic revisions are never edited (issue 7 item 12).

Revision 0001 was edited in place after release, so databases stamped "0001" exist in three
schemas (0002 repairs them). A database records only the revision id it ran, never the text, so an
edit to a released revision silently forks every deployment's schema from a fresh one. Once a
revision ships, its file's sha256 goes into RELEASED; from then on a change fails here: write a new
revision instead (see docs/deployment.md "Upgrades").
"""

from __future__ import annotations

import hashlib
import re

from app.db.migrate import MIGRATIONS_DIR

VERSIONS = MIGRATIONS_DIR / "versions"

# file name -> sha256 of its bytes. A new revision is added here in the commit that releases it.
RELEASED = {
    "2026_11_26_0001_initial_schema.py": ("659dd239a8cc09335f27970153c99f3b89e4b37af1ad64f9524826c1e6717c27"),
    "2026_12_07_0002_repair_published_0001_forms.py": (
        "9dc5f9cd49a54309a60f3f5920be789e5e788ea5260f778dd6b0d68ee5a7f5cc"
    ),
    "2026_12_07_0003_retention_and_sweeper_indexes.py": (
        "262e6575e4407204fc595e882bd4321fe75bc927982683638a68007b756b60c4"
    ),
    "2026_12_07_0004_op_micro_batch_tokens.py": ("17ec75231ac6234172f72229184c97b1f0799121ef22c0fd22df04711432fbdc"),
    "2026_12_07_0005_stability_records.py": ("bead0d5c3c517417e30cdda91c431579cd781025429ae0e67b7b8c6d9b60a546"),
    "2026_12_07_0006_op_token_counts.py": ("dd1a9d861aae562560851d44f3be997c019f98ce372ea6a668151d2b122d9c4f"),
    "2026_12_08_0001_worker_listens.py": ("bda0a41462a78df0810cd8024d9225a30a078f17f42723ba5b08666f9011ede6"),
}


def test_released_revisions_are_unchanged() -> None:
    for name, digest in RELEASED.items():
        path = VERSIONS / name
        assert path.is_file(), f"released revision {name} was removed; released revisions stay forever"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        assert actual == digest, (
            f"released revision {name} was edited (sha256 {actual}). Databases already ran its old text: "
            "revert the edit and add a new revision instead"
        )


def test_every_revision_is_listed_and_ids_are_unique() -> None:
    files = sorted(p.name for p in VERSIONS.glob("*.py") if p.name != "__init__.py")
    unlisted = [name for name in files if name not in RELEASED]
    assert not unlisted, f"add the sha256 of {unlisted} to RELEASED in the commit that releases it"
    ids = [re.search(r'^revision = "([^"]+)"', (VERSIONS / n).read_text(), re.M) for n in files]
    assert all(ids) and len({m[1] for m in ids if m}) == len(files)
